"""Aggregates of one load point's records: percentiles, throughput, goodput, errors, stalls.

Latencies are reported twice: from when the worker sent the request, and from when the
schedule said it was due, so that queueing inside the generator counts against the
figures instead of being hidden (a closed loop's schedule is the moment a slot freed)."""

from __future__ import annotations

import bisect
import collections
import itertools
import math
import statistics
from typing import Any

PERCENTILES = (50, 90, 95, 99)
LATENCIES = ("ttft", "ttft_from_schedule", "tpot", "itl", "e2e", "e2e_from_schedule")


# What a point's load is measured in, and how its axis is labelled
LOAD_KINDS = {"concurrency": "concurrency", "rate": "requests per second", "speedup": "the trace's speedup"}


def load_kind(load: dict[str, Any]) -> str | None:
    """concurrency, rate, or a trace's speedup (None: a point rebuilt without its load)."""
    return next((kind for kind in LOAD_KINDS if kind in load), None)


def label(load: dict[str, Any]) -> str:
    """A load point in a few characters: `c=8`, `2/s poisson (cap 64)`, `trace.jsonl ×2`."""
    if "concurrency" in load:
        return f"c={load['concurrency']}"
    cap = f" (cap {load['max_concurrency']})" if load.get("max_concurrency") else ""
    if "trace" in load:
        return f"{load['trace']} ×{load['speedup']:g}{cap}"
    return f"{load['rate']:g}/s {load['arrival']}{cap}" if "rate" in load else str(load.get("name", "?"))


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
        limit = float(value[:-2]) / 1000 if value.endswith("ms") else float(value.rstrip("s"))
        if not (math.isfinite(limit) and limit > 0):
            raise ValueError(f"an SLO limit is a time above 0, e.g. ttft=500ms; got {part!r}")
        slo[key] = limit
    return slo


def meets(record: dict[str, Any], slo: dict[str, float], open_loop: bool = False) -> bool:
    """Whether a request met every limit. Under an open loop, TTFT and E2E count from when the request was
    due: one that waited (for a --max-concurrency slot, or a late generator) waited for the server's capacity,
    and a search must not find a rate the target served only by falling behind its schedule."""
    if record["outcome"] != "ok":
        return False
    for key, limit in slo.items():
        if key == "itl":
            if record["gaps"] and max(record["gaps"]) > limit:
                return False
            continue
        value = record[key + "_from_schedule"] if open_loop and key in ("ttft", "e2e") else record[key]
        if value is not None and value > limit:
            return False
    return True


def summarize(
    records: list[dict[str, Any]],
    seconds: float,
    flow: dict[str, Any],
    slo: dict[str, float] | None = None,
    open_loop: bool = False,
) -> dict[str, Any]:
    """The point's figures: latencies, outcomes and requests/s over its measured (non-warm-up) records, with
    `seconds` the measured span (first measured send to last end); chunks and output tokens a second from
    `flow`, what arrived inside the steady window (see `window_flow`)."""
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
    per_second = 1 / seconds if seconds > 0 else 0.0
    good = sum(1 for r in measured if meets(r, slo or {}, open_loop))
    return {
        "requests": len(measured),
        "warmup_requests": len(records) - len(measured),
        "seconds": round(seconds, 3),
        "outcomes": dict(outcomes),
        "errors": dict(errors.most_common()),
        "latency": {name: distribution(values) for name, values in latencies.items()},
        "throughput": {
            "requests_per_s": round(len(ok) * per_second, 3),
            "output_tokens_per_s": round(flow["output_tokens"] / flow["seconds"], 1) if flow["seconds"] else 0.0,
            "chunks_per_s": round(flow["chunks"] / flow["seconds"], 1) if flow["seconds"] else 0.0,
        },
        "window": {k: flow[k] for k in ("begin", "end", "seconds", "chunks", "note")},
        "goodput": {
            "slo": slo,
            "requests": good,
            "requests_per_s": round(good * per_second, 3),
            "share": round(good / len(measured), 4) if measured else 0.0,
        }
        if slo
        else None,
        "stalls": {
            "count": len(stalls),
            "after_tokens": [s["after_tokens"] for s in stalls],
            "waited": distribution([s["waited"] for s in stalls]),
        },
        "cache": cache_figures(ok),
    }


def cache_figures(ok: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Cached input tokens, as the server's usage reported them (None: it never did), and time to first token
    apart for requests that found part of their prompt in the cache (hits) and those that did not."""
    reported = [r for r in ok if r.get("cached_tokens") is not None]  # records of older runs have no such field
    if not reported:
        return None
    cached, given = sum(r["cached_tokens"] for r in reported), sum(r["input_tokens"] for r in reported)
    written = [r["cache_creation_tokens"] for r in reported if r["cache_creation_tokens"] is not None]
    hits = [r["ttft"] for r in reported if r["cached_tokens"] > 0 and r["ttft"] is not None]
    misses = [r["ttft"] for r in reported if r["cached_tokens"] == 0 and r["ttft"] is not None]
    return {
        "reported": len(reported),
        "input_tokens": given,
        "cached_input_tokens": cached,
        "cached_share": round(cached / given, 4) if given > 0 else None,
        "cache_creation_tokens": sum(written) if written else None,
        "hits": sum(1 for r in reported if r["cached_tokens"] > 0),
        "misses": sum(1 for r in reported if r["cached_tokens"] == 0),
        "ttft_hit": distribution(hits),
        "ttft_miss": distribution(misses),
    }


def _short(error: str) -> str:
    return error if len(error) <= 80 else error[:77] + "…"


def point_result(
    load: dict[str, Any], records: list[dict[str, Any]], samples: list[dict[str, Any]], lags: list[float],
    slo: dict[str, float], cpu_cores: float | None = None, window: tuple[float, float] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A point's figures: the summary, how the generator did (`samples`, `lags` and `cpu_cores`, the
    generator's mean CPU, come from the live run; a report rebuilt from records alone has none of
    them), and its per-second series. `window` is the steady window (see `steady_window`)."""
    measured = _measured(records)
    begin = min((r["scheduled"] for r in measured), default=0.0)
    finish = max((r["end"] for r in measured), default=0.0)
    flow = window_flow(records, *(window or steady_window(records)))
    flow["note"] = _outlasting(records, flow)
    summary = summarize(records, max(finish - begin, 1e-9) if measured else 0.0, flow, slo or None,
                        open_loop=load_kind(load) in ("rate", "speedup"))  # fmt: skip
    late = sorted(r["submitted"] - r["scheduled"] for r in measured)
    lags = sorted(lags)
    generator = {
        "in_flight_mean": round(flow["in_flight"], 2),
        "submit_late_p99": round(late[int(0.99 * (len(late) - 1))], 6) if late else None,
        "loop_lag_p99": round(lags[int(0.99 * (len(lags) - 1))], 6) if lags else None,
        "cpu_cores_mean": round(cpu_cores, 3) if cpu_cores is not None else None,
    }
    generator["verdict"] = verdict(load, generator)
    return {"load": load, "summary": summary, "generator": generator, "series": _series(records, samples)}


def steady_window(
    records: list[dict[str, Any]], warmup: float | None = None, duration: float | None = None
) -> tuple[float, float]:
    """Where the load was steady, in seconds from the point's start: from the end of the warm-up (else the
    first measured request's schedule) to the end of `--duration` (else the last measured schedule, when
    requests stopped going out); when everything went out at once, to the last measured end. With nothing
    measured (every request began in the warm-up), the warm-up's requests stand in."""
    measured = _measured(records) or [r for r in records if r["sent"] is not None and r["end"] is not None]
    begin = warmup if warmup is not None else min((r["scheduled"] for r in measured), default=0.0)
    end = duration or max((r["scheduled"] for r in measured), default=begin)
    if end - begin <= 0.01:
        end = max((r["end"] for r in measured), default=begin)
    return begin, end


def window_flow(records: list[dict[str, Any]], begin: float, end: float) -> dict[str, Any]:
    """What moved inside [begin, end): chunks by when each arrived (rebuilt from `first_token` and `gaps`),
    output tokens in proportion, and streams in flight at the target (send to last bytes), whenever their
    requests started or ended, warm-up ones included: a request longer than the window still counts."""
    seconds = end - begin
    timed = [r for r in records if r["sent"] is not None and r["end"] is not None]
    chunks = output = busy = 0.0
    for r in timed:
        arrivals = _arrivals(r)
        inside = bisect.bisect_left(arrivals, end) - bisect.bisect_left(arrivals, begin)
        chunks += inside
        if r["outcome"] == "ok" and r["output_tokens"] > 0 and arrivals:
            output += r["output_tokens"] * inside / len(arrivals)
        overlap = min(r["end"], end) - max(r["sent"], begin)
        busy += max(overlap, 0.0)
    return {
        "begin": round(begin, 3),
        "end": round(end, 3),
        "seconds": round(max(seconds, 0.0), 3),
        "chunks": int(chunks),
        "output_tokens": output,
        "in_flight": busy / seconds if seconds > 0 else 0.0,
    }


def _measured(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records past the warm-up that were sent and ended."""
    return [r for r in records if not r["warmup"] and r["sent"] is not None and r["end"] is not None]


def _arrivals(record: dict[str, Any]) -> list[float]:
    """When each chunk of a record arrived: the first at `first_token`, the rest one gap after another
    (a plain answer's chunks all arrive with it)."""
    if record["first_token"] is None or not record["chunks"]:
        return []
    times = list(itertools.accumulate(record["gaps"], initial=record["first_token"]))
    return times + [times[-1]] * (record["chunks"] - len(times))


def _outlasting(records: list[dict[str, Any]], flow: dict[str, Any]) -> str | None:
    """Say so when the typical request in the window took longer than the window, or none began after the
    warm-up: chunks and streams still count inside it, but few requests (or none) were measured whole."""
    begin, end, seconds = flow["begin"], flow["end"], flow["seconds"]
    lasting = [r["end"] - r["sent"] for r in records
               if r["sent"] is not None and r["end"] is not None and r["sent"] < end and r["end"] > begin]  # fmt: skip
    typical = statistics.median(lasting) if lasting else 0.0
    unmeasured = bool(lasting) and not _measured(records)
    if not unmeasured and typical <= seconds:
        return None
    whole = "none began after the warm-up" if unmeasured else "few were measured whole"
    return (
        f"requests outlast the steady window ({begin:.1f}-{end:.1f} s): they took {typical:.1f} s (median) "
        f"and {whole}; chunks/s and streams in flight count what moved inside the window. "
        f"Try --duration {math.ceil(begin + 5 * typical)} or more."
    )


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
