"""Adaptive concurrency for one provider's lane: what a 429 means for the whole batch.

Additive increase, multiplicative decrease: every answer that is not throttled adds
1/limit (about +1 per window of answers); a 429 or 529 halves the limit (at most once
per second, so one burst of throttled answers counts once) and pauses new requests
for the provider's `retry-after`. The limit never exceeds the configured concurrency
and never drops below 1.
"""

from __future__ import annotations

import asyncio
import time


class Lane:
    def __init__(self, ceiling: int) -> None:
        self.ceiling = max(1, ceiling)
        self.limit = float(self.ceiling)
        self.lowest = self.ceiling
        self.in_flight = 0
        self.resume_at = 0.0
        self._last_cut = -1e9
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        """Wait for a slot under the current limit and past any retry-after pause."""
        while True:
            async with self._changed:
                pause = self.resume_at - time.monotonic()
                if pause <= 0 and self.in_flight < int(self.limit):
                    self.in_flight += 1
                    return
                if pause <= 0:
                    await self._changed.wait()
                    continue
            await asyncio.sleep(pause)

    async def release(self, throttled: bool, retry_after: float = 0.0) -> None:
        async with self._changed:
            self.in_flight -= 1
            now = time.monotonic()
            if throttled:
                if now - self._last_cut >= 1.0:
                    self.limit = max(1.0, self.limit / 2)
                    self._last_cut = now
                    self.lowest = min(self.lowest, int(self.limit))
                self.resume_at = max(self.resume_at, now + retry_after)
            else:
                self.limit = min(float(self.ceiling), self.limit + 1 / self.limit)
            self._changed.notify_all()
