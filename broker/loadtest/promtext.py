"""Reading a Prometheus text page (what vLLM, SGLang and TGI serve at /metrics) into flat numbers.

Each series is keyed by its sample name and labels, as Prometheus writes them
(`vllm:num_requests_running{model_name="m"}`), and is a counter or a gauge. A histogram keeps
its `_sum` and `_count` as counters, whose increases over a window give the mean observed value
exactly, and its buckets apart (never written per second: a vLLM histogram has 10 to 40 of them per
label set, which would bury the series that matter), from which a window's quantiles are estimated
as Prometheus's `histogram_quantile` does. A summary keeps `_sum` and `_count` as counters and its
quantiles as gauges. Info, state-set and enum families (labels dressed as numbers) and the `_created`
timestamps are left out, and so are values that are not finite.
"""

from __future__ import annotations

import fnmatch
import math
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

_SKIPPED = ("info", "stateset", "enum")
_COUNTED = ("counter", "histogram", "summary")  # their _sum/_count (and a counter's _total) only grow


class Page(NamedTuple):
    """One scrape: value and kind ("counter" or "gauge") of every chosen series; histogram buckets as
    {series without `le`: {upper bound: cumulative count}}; and how many families the page had."""

    values: dict[str, float]
    kinds: dict[str, str]
    buckets: dict[str, dict[float, float]]
    families: int


class Selection:
    """Comma-separated names or glob patterns (`vllm:*_running`), each matched against a family's
    name, its samples' names and their keys with labels; none means every series."""

    def __init__(self, patterns: str) -> None:
        self.patterns = [p.strip() for p in patterns.split(",") if p.strip()]
        self.used: set[str] = set()

    def __call__(self, *names: str) -> bool:
        if not self.patterns:
            return True
        for pattern in self.patterns:
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                self.used.add(pattern)
                return True
        return False

    def unmatched(self) -> list[str]:
        return [p for p in self.patterns if p not in self.used]


def parse(text: str, select: Selection) -> Page:
    """The chosen series of a page; ValueError if it is not Prometheus text."""
    values: dict[str, float] = {}
    kinds: dict[str, str] = {}
    buckets: dict[str, dict[float, float]] = {}
    families = 0
    for family in text_string_to_metric_families(text):
        families += 1
        if family.type in _SKIPPED or family.name.endswith("_created"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created") or not math.isfinite(sample.value):
                continue
            key = series_key(sample.name, sample.labels)
            if not select(family.name, sample.name, key):
                continue
            if sample.name.endswith("_bucket") and "le" in sample.labels:
                bounds = buckets.setdefault(series_key(family.name, sample.labels, drop="le"), {})
                bounds[float(sample.labels["le"])] = sample.value
                continue
            values[key] = sample.value
            counted = family.type in _COUNTED and "quantile" not in sample.labels
            kinds[key] = "counter" if counted else "gauge"
    return Page(values, kinds, buckets, families)


def series_key(name: str, labels: dict[str, str], drop: str = "") -> str:
    """`name{a="1",b="2"}`, labels sorted; the bare name when it has none."""
    pairs = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != drop)
    return f"{name}{{{pairs}}}" if pairs else name


def quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """The q-quantile of observations counted in cumulative buckets {upper bound: count}, interpolated
    linearly inside its bucket (the lowest from 0); an answer in the +Inf bucket is the highest finite
    bound. None when nothing was observed."""
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = bound, count
    return lower
