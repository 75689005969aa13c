"""When requests are due: a constant or Poisson rate, optionally ramped up from zero; and which
of a point's requests a generator sends when several share the point (`--ray`)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


def arrivals(rate: float, process: str, ramp: float = 0.0, seed: int = 0) -> Iterator[float]:
    """Offsets in seconds from the start, forever (the caller stops by count or duration).

    With `ramp`, the rate rises linearly from 0 to `rate` over `ramp` seconds: arrivals
    are spaced in the ramp's cumulative expected count Λ(t), which is `rate·t²/(2·ramp)`
    during the ramp and linear after it (so a Poisson ramp stays a Poisson process)."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if process not in ("constant", "poisson"):
        raise ValueError(f"arrival process must be constant or poisson, not {process!r}")
    rng = random.Random(seed)
    area = rng.expovariate(1.0) if process == "poisson" else 0.0  # Λ(t) of the next arrival
    while True:
        yield _time_of(area, rate, ramp)
        area += rng.expovariate(1.0) if process == "poisson" else 1.0


def _time_of(area: float, rate: float, ramp: float) -> float:
    """Invert Λ: the time by which `area` arrivals are expected."""
    ramp_area = rate * ramp / 2
    if ramp and area <= ramp_area:
        return math.sqrt(2 * area * ramp / rate)
    return ramp + (area - ramp_area) / rate


class Share(msgspec.Struct, frozen=True):
    """Generator `node`'s part of a point that `nodes` generators share, beginning at `start` (its own
    `time.monotonic_ns()`; 0: at once). Streams, caps and request counts are split as evenly as they go,
    the remainder to the first generators; request and conversation numbers, and an open loop's
    arrivals, are dealt in turn: the generators together send one generator's schedule, with its
    numbers, and each of them a thinned copy of it (for a constant rate, one that keeps its spacing)."""

    node: int = 0
    nodes: int = 1
    start: int = 0

    def part(self, whole: int) -> int:
        return whole // self.nodes + (self.node < whole % self.nodes)

    def numbers(self) -> Iterator[int]:
        return itertools.count(self.node, self.nodes)

    def mine(self, items: Iterable[T]) -> Iterator[T]:
        return itertools.islice(items, self.node, None, self.nodes)

    def load(self, load: dict[str, Any]) -> dict[str, Any]:
        """This generator's part of a point's load, as its figures show it (an open loop: the rate it sends at)."""
        if "concurrency" in load:
            return {"concurrency": self.part(load["concurrency"])}
        return load | {"rate": load["rate"] / self.nodes, "max_concurrency": self.part(load["max_concurrency"])}
