"""When requests are due: a constant or Poisson rate, optionally ramped up from zero."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator


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
