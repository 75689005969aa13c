"""Aggregates of one load point's records: percentiles, throughput, goodput, errors, stalls.

Latencies are reported twice: from when the worker sent the request, and from when the
schedule said it was due, so that queueing inside the generator counts against the
figures instead of being hidden (a closed loop's schedule is the moment a slot freed)."""

from __future__ import annotations

import collections
import statistics
from typing import Any

PERCENTILES = (50, 90, 95, 99)
LATENCIES = ("ttft", "ttft_from_schedule", "tpot", "itl", "e2e", "e2e_from_schedule")


def distribution(values: list[float]) -> dict[str, float | None]:
    """mean and p50/p90/p95/p99 (nearest rank), in seconds; None when there is nothing."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "n": 0}
    ordered = sorted(values)
    ranks = {f"p{p}": ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))] for p in PERCENTILES}
    return {"mean": round(statistics.fmean(ordered), 6), **ranks, "n": len(ordered)}


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=0.5,tpot=0.05,e2e=10` (seconds; `ms` suffix allowed) -> limits by metric."""
    slo: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("ttft", "tpot", "e2e", "itl"):
            raise ValueError(f"expected ttft=…,tpot=…,e2e=… in seconds (or ms); got {part!r}")
        value = value.strip()
        slo[key] = float(value[:-2]) / 1000 if value.endswith("ms") else float(value.rstrip("s"))
    return slo


def meets(record: dict[str, Any], slo: dict[str, float]) -> bool:
    if record["outcome"] != "ok":
        return False
    for key, limit in slo.items():
        if key == "itl":
            if record["gaps"] and max(record["gaps"]) > limit:
                return False
        elif record[key] is not None and record[key] > limit:
            return False
    return True


def summarize(records: list[dict[str, Any]], seconds: float, slo: dict[str, float] | None = None) -> dict[str, Any]:
    """The point's figures over its measured (non-warm-up) records; `seconds` is the
    measured window (first measured send to last end)."""
    measured = [r for r in records if not r["warmup"]]
    ok = [r for r in measured if r["outcome"] == "ok"]
    latencies: dict[str, list[float]] = {name: [] for name in LATENCIES}
    for r in ok:
        for name in LATENCIES:
            if name == "itl":
                latencies["itl"].extend(r["gaps"])
            elif r[name] is not None:
                latencies[name].append(r[name])
    outcomes = collections.Counter(r["outcome"] for r in measured)
    errors = collections.Counter(f"{r['outcome']}: {_short(r['error'])}" for r in measured if r["outcome"] != "ok")
    stalls = [r["stall"] for r in measured if r["stall"]]
    chunks = sum(r["chunks"] for r in measured)
    output = sum(r["output_tokens"] for r in ok)
    per_second = 1 / seconds if seconds > 0 else 0.0
    good = sum(1 for r in measured if meets(r, slo or {}))
    return {
        "requests": len(measured),
        "warmup_requests": len(records) - len(measured),
        "seconds": round(seconds, 3),
        "outcomes": dict(outcomes),
        "errors": dict(errors.most_common()),
        "latency": {name: distribution(values) for name, values in latencies.items()},
        "throughput": {
            "requests_per_s": round(len(ok) * per_second, 3),
            "output_tokens_per_s": round(output * per_second, 1),
            "chunks_per_s": round(chunks * per_second, 1),
        },
        "goodput": {"slo": slo, "requests": good, "requests_per_s": round(good * per_second, 3)} if slo else None,
        "stalls": {
            "count": len(stalls),
            "after_tokens": [s["after_tokens"] for s in stalls],
            "waited": distribution([s["waited"] for s in stalls]),
        },
    }


def _short(error: str) -> str:
    return error if len(error) <= 80 else error[:77] + "…"


def point_result(
    load: dict[str, Any], records: list[dict[str, Any]], samples: list[dict[str, Any]], lags: list[float],
    slo: dict[str, float], cpu_cores: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A point's figures: the summary, how the generator did (`samples`, `lags` and `cpu_cores`, the
    generator's mean CPU, come from the live run; a report rebuilt from records alone has none of
    them), and its per-second series."""
    measured = [r for r in records if not r["warmup"] and r["sent"] is not None and r["end"] is not None]
    begin = min((r["scheduled"] for r in measured), default=0.0)
    finish = max((r["end"] for r in measured), default=0.0)
    window = max(finish - begin, 1e-9)
    summary = summarize(records, window if measured else 0.0, slo or None)
    # Streams in flight at the target (worker's send to the last bytes) while requests were still
    # being issued, warm-up requests included while they overlap (not during the drain at the end)
    steady_end = max((r["scheduled"] for r in measured), default=0.0)
    steady = steady_end - begin
    timed = [r for r in records if r["sent"] is not None and r["end"] is not None]
    in_flight = (
        sum(max(0.0, min(r["end"], steady_end) - max(r["sent"], begin)) for r in timed) / steady
        if steady > 0.01
        else sum(r["end"] - r["sent"] for r in measured) / window
    )
    late = sorted(r["submitted"] - r["scheduled"] for r in measured)
    lags = sorted(lags)
    generator = {
        "in_flight_mean": round(in_flight, 2),
        "submit_late_p99": round(late[int(0.99 * (len(late) - 1))], 6) if late else None,
        "loop_lag_p99": round(lags[int(0.99 * (len(lags) - 1))], 6) if lags else None,
        "cpu_cores_mean": round(cpu_cores, 3) if cpu_cores is not None else None,
    }
    generator["verdict"] = verdict(load, generator)
    return {"load": load, "summary": summary, "generator": generator, "series": _series(records, samples)}


def verdict(load: dict[str, Any], g: dict[str, Any]) -> str:
    """Say plainly whether the generator, not the target, was the limit."""
    problems = []
    asked = load.get("concurrency")
    if asked and g["in_flight_mean"] < 0.95 * asked:
        problems.append(f"only {g['in_flight_mean']:.1f} of the {asked} requested streams were in flight on average")
    if g["loop_lag_p99"] is not None and g["loop_lag_p99"] > 0.05:
        problems.append(f"its event loop lagged {g['loop_lag_p99'] * 1000:.0f} ms (p99)")
    if not asked and not load.get("max_concurrency") and (g["submit_late_p99"] or 0) > 0.05:
        problems.append(f"requests went out up to {g['submit_late_p99'] * 1000:.0f} ms after their schedule (p99)")
    if problems:
        return "the generator was the limit: " + "; ".join(problems)
    return "the generator kept up"


def _series(records: list[dict[str, Any]], samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per second of the point: offered (scheduled) and achieved (sent, completed) load, streams
    in flight at the second's middle (from the records), and the sampler's CPU and lag."""
    if not records:
        return []
    first = min(r["scheduled"] for r in records)
    seconds = int(max((r["end"] or r["scheduled"]) for r in records) - first) + 1
    rows = [{"second": s, "offered": 0, "sent": 0, "completed": 0, "in_flight": 0} for s in range(seconds)]
    for r in records:
        rows[int(r["scheduled"] - first)]["offered"] += 1
        if r["sent"] is not None:
            rows[min(seconds - 1, int(r["sent"] - first))]["sent"] += 1
        if r["end"] is not None:
            rows[min(seconds - 1, int(r["end"] - first))]["completed"] += 1
            if r["sent"] is not None:
                for s in range(max(0, int(r["sent"] - first + 0.5)), min(seconds, int(r["end"] - first + 0.5))):
                    rows[s]["in_flight"] += 1
    for row, sample in zip(rows, samples, strict=False):
        row |= {k: sample[k] for k in ("cpu_cores", "loop_lag_max", "ticks_per_s")}
    return rows
