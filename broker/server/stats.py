"""Counters and latency histograms kept by the broker and served to `isopool stats`."""

from __future__ import annotations

import bisect
from collections import Counter, deque
from typing import Any

from ..prices import PriceTable
from ..protocol import BUCKETS, Happening, HistogramSnapshot
from .usage import Accounts


class Histogram:
    """Fixed buckets: constant memory whatever the traffic; quantiles are bucket upper bounds."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0
        self.sum = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += 1
        self.sum += seconds

    def quantile(self, q: float) -> float | None:
        if not self.total:
            return None
        rank = q * self.total
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return BUCKETS[i] if i < len(BUCKETS) else float("inf")
        return None

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(
            count=self.total,
            mean=self.sum / self.total if self.total else None,
            p50=self.quantile(0.5),
            p99=self.quantile(0.99),
            buckets={f"le_{b:g}": c for b, c in zip(BUCKETS, self.counts, strict=False)} | {"inf": self.counts[-1]},
        )


RECENT_KEPT = 20  # kills, retries and fallbacks kept for `isopool top`
# A caller names the models of the pairs in `fallbacks`: past this many, the rest count as one.
MAX_FALLBACK_PAIRS = 1000


class Stats:
    def __init__(self, prices: PriceTable | None = None) -> None:
        self.requests: Counter[str] = Counter()  # accepted, ok, error:<code>, cancelled
        self.kills: Counter[str] = Counter()  # by Reason
        self.stalls: Counter[str] = Counter()  # by Reason (the stall kinds)
        self.retries = 0
        self.retries_by: Counter[str] = Counter()  # by Reason: http_429, http_5xx, headers_timeout, ...
        self.fallbacks: Counter[str] = Counter()  # calls moved to another target, by "from>to"
        self.rescued: Counter[str] = Counter()  # calls answered after a failed attempt, by how (prefill, replay too)
        self.spawns = 0
        self.respawns = 0
        self.zygote_restarts = 0
        self.exits: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()  # malformed or refused messages, by code
        self.latency = Histogram()
        self.first_event = Histogram()
        self.continuations: Counter[str] = Counter()  # continuation attempts, by "<strategy>:<outcome>"
        self.events = 0  # delivered to callers
        self.recent: deque[tuple[float, str, str]] = deque(maxlen=RECENT_KEPT)  # (when, what, detail)
        self.tokens = Accounts(prices)  # by profile/model and by client, as the providers reported them

    def note(self, now: float, what: str, detail: str) -> None:
        """Keep a kill, retry or fallback for `isopool top`."""
        self.recent.append((now, what, detail))

    def moved(self, was: str, to: str) -> None:
        """Count a call moved from one target to another (profile/model)."""
        pair = f"{was}>{to}"
        if pair not in self.fallbacks and len(self.fallbacks) >= MAX_FALLBACK_PAIRS:
            pair = "(other pairs)"
        self.fallbacks[pair] += 1

    def snapshot(self, now: float) -> dict[str, Any]:
        """The counters' share of the broker's `Snapshot`, by field."""
        return {
            "requests": dict(self.requests),
            "kills": dict(self.kills),
            "stalls": dict(self.stalls),
            "retries": self.retries,
            "spawns": self.spawns,
            "respawns": self.respawns,
            "zygote_restarts": self.zygote_restarts,
            "exits": dict(self.exits),
            "rejected": dict(self.rejected),
            "latency": self.latency.snapshot(),
            "first_event": self.first_event.snapshot(),
            "retries_by_reason": dict(self.retries_by),
            "fallbacks": dict(self.fallbacks),
            "rescued": dict(self.rescued),
            "continuations": dict(self.continuations),
            "events": self.events,
            "recent": [Happening(round(now - at, 1), what, detail) for at, what, detail in reversed(self.recent)],
            **self.tokens.snapshot(),
        }
