"""`isopool loadtest --find-max`: the highest rate (or concurrency, or a trace's speedup) whose goodput
meets a bar.

A probe is an ordinary load point; it passes when the share of its measured requests that met
every SLO limit reaches the bar. The search starts low and doubles the load until a probe fails
(or `limit` is reached), then bisects, geometrically since the precision is relative, between the
highest pass below the lowest failure and that failure, until the two are within `precision` of
each other or the probes run out. A start that fails makes it halve instead. Each probe is chosen
from the ones before it (`next_load` is pure), so `conclude` can say the same of a killed run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from .options import Options

GROWTH = 2.0
_CONCURRENCY_LIMIT = 256  # streams the pool is sized for when --max does not say
_KEPT_UP = "the generator kept up"  # the verdicts of summary.verdict
_LIMIT = "the generator was the limit: "


class Search(msgspec.Struct, frozen=True, kw_only=True):
    """What `--find-max` searches over (rate or concurrency), the bar (`goodput`, the share of a probe's
    measured requests that must meet every SLO limit), the first load (`start`, 0: 1), the highest
    (`limit`, 0: none for a rate, 256 streams for concurrency), when to stop (`precision`, relative) and
    the most probes to run."""

    over: str = "rate"
    goodput: float = 0.95
    start: float = 0.0
    limit: float = 0.0
    precision: float = 0.1
    max_probes: int = 12

    def __post_init__(self) -> None:
        if self.over not in ("rate", "concurrency", "speedup"):
            raise ValueError(f"--find-max searches over rate, concurrency or a trace's speedup, not {self.over!r}")
        if not 0 < self.goodput <= 1:
            raise ValueError(f"--goodput is the share of requests that must meet the SLO, between 0 and 1 "
                             f"(e.g. 0.95), not {self.goodput:g}")  # fmt: skip
        if not (math.isfinite(self.start) and math.isfinite(self.limit)) or self.start < 0 or self.limit < 0:
            raise ValueError("--start and --max are numbers, not negative")
        if self.over == "concurrency" and (self.start % 1 or self.limit % 1):
            raise ValueError("--start and --max count streams under --find-max concurrency: give whole numbers")
        if self.limit and self.limit < self.first:
            raise ValueError(f"--max ({self.limit:g}) must be at least --start ({self.first:g})")
        if not 0 < self.precision < 1:
            raise ValueError(f"--precision is relative, e.g. 0.1 for 10%, not {self.precision:g}")
        if self.max_probes < 2:
            raise ValueError("--max-probes must be at least 2")

    @property
    def first(self) -> float:
        return self.start or 1.0

    @property
    def ceiling(self) -> float:
        """The highest load to probe."""
        return self.limit or (_CONCURRENCY_LIMIT if self.over == "concurrency" else math.inf)

    def rounded(self, load: float) -> float:
        """Whole streams; a rate to three significant figures, which reads well and is finer than any precision."""
        return max(1, round(load)) if self.over == "concurrency" else float(f"{load:.3g}")

    def load_of(self, point: dict[str, Any]) -> float:
        return point["load"][self.over]

    def passed(self, point: dict[str, Any]) -> bool:
        return share(point) >= self.goodput

    def shown(self, load: float) -> str:
        if self.over == "speedup":
            return f"the trace at {load:g}x its speed"
        return f"{load:g} req/s" if self.over == "rate" else f"{load:g} stream" + ("s" if load != 1 else "")


def share(point: dict[str, Any]) -> float:
    """The share of a point's measured requests that met every SLO limit."""
    goodput = point["summary"]["goodput"]
    return goodput["share"] if goodput else 0.0


def next_load(search: Search, probes: list[tuple[float, bool]]) -> float | None:
    """The load to probe after `probes` ((load, passed) in the order run), or None when the search is over."""
    if not probes:
        return search.first
    if len(probes) >= search.max_probes:
        return None
    passes = [load for load, ok in probes if ok]
    fails = [load for load, ok in probes if not ok]
    if not fails:
        top = max(passes)
        return None if top >= search.ceiling else search.rounded(min(top * GROWTH, search.ceiling))
    lowest_fail = min(fails)
    below = [load for load in passes if load < lowest_fail]
    if not below:
        lower = search.rounded(lowest_fail / GROWTH)
        return lower if lower < lowest_fail else None
    best = max(below)
    if lowest_fail <= best * (1 + search.precision):
        return None
    middle = search.rounded(math.sqrt(best * lowest_fail))
    return middle if best < middle < lowest_fail else None


def probes(search: Search, points: list[dict[str, Any]]) -> list[tuple[float, bool]]:
    return [(search.load_of(point), search.passed(point)) for point in points]


def loads(options: Options, points: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The probes' loads, one at a time, each chosen from `points` as they stand when it is asked for
    (the runner appends each probe's point before asking for the next)."""
    search = options.find_max
    assert search is not None
    while (load := next_load(search, probes(search, points))) is not None:
        yield options.load(search.over, load)


def conclude(search: Search, slo: dict[str, float], points: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer so far: the highest passing load below the lowest failure and the two probes that
    bracket it; whether it is only a lower bound (nothing failed, or the generator was the limit where
    the bar failed, so the failure may be the generator's) or may overstate (the generator was the limit
    where it passed, so the target saw less than that load); whether the search is over; and sentences
    that say all of it."""
    failed = min((p for p in points if not search.passed(p)), key=search.load_of, default=None)
    fails_at = search.load_of(failed) if failed else math.inf
    passed = max((p for p in points if search.passed(p) and search.load_of(p) < fails_at), key=search.load_of,
                 default=None)  # fmt: skip
    return {
        "over": search.over,
        "goodput": search.goodput,
        "slo": slo,
        "answer": search.load_of(passed) if passed else None,
        "passed": _brief(search, passed),
        "failed": _brief(search, failed),
        "lower_bound": passed is not None and (failed is None or _limited(failed)),
        "may_overstate": passed is not None and _limited(passed),
        "done": next_load(search, probes(search, points)) is None,
        "probes": len(points),
        "text": _sentences(search, slo, points, passed, failed),
    }


def probe_note(search: Search, point: dict[str, Any]) -> str:
    """One line after each probe, for the live display."""
    verdict = "passes" if search.passed(point) else "fails"
    return (f"probe at {search.shown(search.load_of(point))}: {share(point):.0%} of {point['summary']['requests']} "
            f"requests met the SLO (bar {search.goodput:.0%}): {verdict}")  # fmt: skip


def _sentences(
    search: Search, slo: dict[str, float], points: list[dict[str, Any]], passed: dict | None, failed: dict | None
) -> list[str]:
    limits = ", ".join(f"{key}<={_duration(limit)}" for key, limit in slo.items())
    bar = f"{search.goodput:.0%} of requests"
    lines = []
    if passed is not None:
        lines.append(f"highest {search.over} meeting {limits} for {bar}: {search.shown(search.load_of(passed))}")
    elif failed is not None:
        lines.append(f"no {search.over} met {limits} for {bar}: even {_probe(search, failed)} failed")
    if passed is not None and failed is not None:
        lines.append(f"between {_probe(search, passed)}, which passed, and {_probe(search, failed)}, which failed")
    elif passed is not None:
        bound = f" up to --max ({search.shown(search.ceiling)})" if search.load_of(passed) >= search.ceiling else ""
        lines.append(f"no probe failed{bound}: the answer is a lower bound")
    if passed is not None and failed is not None and _limited(failed):
        lines.append(f"the generator was the limit at {search.shown(search.load_of(failed))}, where the bar failed, "
                     f"so the failure may be its own and the answer is a lower bound: {_why(failed)}")  # fmt: skip
    if passed is not None and _limited(passed):
        lines.append(f"the generator was the limit at {search.shown(search.load_of(passed))}, where the bar passed, "
                     f"so the target saw less than that and the answer may overstate it: {_why(passed)}")  # fmt: skip
    ran = probes(search, points)
    if next_load(search, ran) is not None:
        lines.append(f"the run ended before the search did ({len(points)} probes)")
    elif next_load(msgspec.structs.replace(search, max_probes=len(ran) + 1), ran) is not None:
        lines.append(f"the {len(ran)} probes (--max-probes) ran out before the search was over")
    return lines


def _limited(point: dict[str, Any]) -> bool:
    return point["generator"]["verdict"] != _KEPT_UP


def _why(point: dict[str, Any]) -> str:
    return point["generator"]["verdict"].removeprefix(_LIMIT)


def _brief(search: Search, point: dict[str, Any] | None) -> dict[str, Any] | None:
    if point is None:
        return None
    return {"load": search.load_of(point), "share": share(point), "verdict": point["generator"]["verdict"]}


def _probe(search: Search, point: dict[str, Any]) -> str:
    measured = point["summary"]["requests"]
    return f"{search.shown(search.load_of(point))} ({share(point):.0%} of {measured} requests good)"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"
