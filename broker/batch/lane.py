"""Adaptive concurrency for one provider's lane: what a 429 means for the whole batch.

Additive increase, multiplicative decrease: every answer that is not throttled adds
1/limit (about +1 per window of answers); a 429 or 529 halves the limit (at most once
per second, so one burst of throttled answers counts once) and pauses new requests
for the provider's `retry-after`. The limit never exceeds the configured concurrency
and never drops below 1. Optional ceilings of requests and (estimated) tokens per
minute hold requests back over a sliding 60-second window.
"""

from __future__ import annotations

import asyncio
import collections
import time

WINDOW = 60.0


class Lane:
    def __init__(self, ceiling: int, rpm: int = 0, tpm: int = 0) -> None:
        self.ceiling = max(1, ceiling)
        self.rpm, self.tpm = rpm, tpm
        self._sent: collections.deque[tuple[float, int]] = collections.deque()  # (when, estimated tokens)
        self._tokens = 0
        self.limit = float(self.ceiling)
        self.lowest = self.ceiling
        self.in_flight = 0
        self.resume_at = 0.0
        self._last_cut = -1e9
        self._changed = asyncio.Condition()

    async def acquire(self, tokens: int = 0) -> None:
        """Wait for a slot under the current limit, past any retry-after pause and within the
        per-minute ceilings; `tokens` is the request's estimated token count."""
        while True:
            async with self._changed:
                now = time.monotonic()
                pause = max(self.resume_at - now, self._ceiling_wait(now, tokens))
                if pause <= 0 and self.in_flight < int(self.limit):
                    self.in_flight += 1
                    if self.rpm or self.tpm:
                        self._sent.append((now, tokens))
                        self._tokens += tokens
                    return
                if pause <= 0:
                    await self._changed.wait()
                    continue
            await asyncio.sleep(pause)

    def _ceiling_wait(self, now: float, tokens: int) -> float:
        """Seconds until one more request of `tokens` fits under the rpm and tpm ceilings."""
        while self._sent and self._sent[0][0] <= now - WINDOW:
            self._tokens -= self._sent.popleft()[1]
        wait = 0.0
        if self.rpm and len(self._sent) >= self.rpm:
            wait = self._sent[len(self._sent) - self.rpm][0] + WINDOW - now
        if self.tpm and self._sent and self._tokens + tokens > self.tpm:
            freed, need = 0, self._tokens + tokens - self.tpm
            for when, cost in self._sent:  # the oldest sends leave the window first
                freed += cost
                if freed >= need:
                    wait = max(wait, when + WINDOW - now)
                    break
        return wait

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
