"""PROOF OF CONCEPT (issue 21; off unless $ISOPOOL_COALESCE_MS is set): a stream's events sent in
fewer messages. A provider that writes each event in its own write costs one ZeroMQ message per
event on each of the two hops back to the caller, and each message costs the worker ~45 µs and
the broker ~20 µs (py-spy: `Socket.send`, `getsockopt(EVENTS)`, `recv`). Here an event goes out at
once when none went out in the last `window`; otherwise it waits, with those that follow, until
the window since the last send has passed. So the first event and every event after a pause are
not delayed at all, a flood goes out once per window, and nothing waits past the stream's end
(every other message flushes what is pending first)."""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any

from .main import Emitter

WINDOW = float(os.environ.get("ISOPOOL_COALESCE_MS") or 0) / 1000


class CoalescingEmitter(Emitter):
    def __init__(self, sock: Any, codec: Any, rid: int, window: float = WINDOW) -> None:
        super().__init__(sock, codec, rid)
        self._window = window
        self._pending: list[tuple[str, bytes]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._last = -math.inf

    async def events(self, batch: list[tuple[str, bytes]]) -> None:
        loop = asyncio.get_running_loop()
        if not self._pending and loop.time() - self._last >= self._window:
            self._last = loop.time()
            self.send_events(batch)
            return
        self._pending += batch
        if self._timer is None:
            self._timer = loop.call_at(self._last + self._window, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            batch, self._pending = self._pending, []
            self._last = asyncio.get_running_loop().time()
            self.send_events(batch)

    async def head(self, response: Any) -> None:
        self.flush()
        await super().head(response)

    async def error_event(self, event: tuple[str, bytes]) -> None:
        self.flush()
        await super().error_event(event)

    async def progress(self) -> None:
        self.flush()
        await super().progress()

    async def result(self, response: Any) -> None:
        self.flush()
        await super().result(response)

    async def error(self, info: Any) -> None:
        self.flush()
        await super().error(info)
