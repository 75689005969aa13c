"""What every figure script shares: the machine description, medians and p99s in
milliseconds, ABAB timing against a baseline, and printing/saving the results."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0]}


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 3)


def p99_ms(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3)


def alternate(first: Callable[[], Any], second: Callable[[], Any], repeat: int, warmup: int = 20):
    """Time `first` and `second` in turn (ABAB), so that drift in machine load hits both alike."""
    a, b = [], []
    for _ in range(warmup):
        first(), second()
    for _ in range(repeat):
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        a.append(t1 - t0)
        b.append(time.perf_counter() - t1)
    return a, b


def emit(results: dict[str, Any], path: str | None) -> None:
    """Print the figures as JSON, and write them to `path` if given."""
    print(json.dumps(results, indent=2))
    if path:
        with open(path, "w") as out:
            json.dump(results, out, indent=2)
