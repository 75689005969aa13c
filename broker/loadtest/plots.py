"""PNG plots of a load test (matplotlib, from the `plots` extra): latency distributions per
load point, the per-second series, for a sweep (or a search's probes) throughput and latency
against the swept concurrency or rate, and for a search each probe's goodput against the bar."""

from __future__ import annotations

import os
from typing import Any

from .serverplots import server_panels
from .summary import LOAD_KINDS, label, load_kind

INSTALL = "pip install 'isopool[plots]'"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write(results: dict[str, Any], records: list[dict[str, Any]], out_dir: str) -> list[str]:
    """Write the plots into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [_distributions(plt, results, records, out_dir), _series(plt, results, out_dir)]
    if len(results["points"]) > 1:
        written.append(_sweep(plt, results, out_dir))
    if results.get("search"):
        written.append(_search(plt, results, out_dir))
    return written


def _distributions(plt: Any, results: dict[str, Any], records: list[dict[str, Any]], out_dir: str) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for number, point in enumerate(results["points"]):
        mine = [r for r in records if r["point"] == number and not r["warmup"] and r["outcome"] == "ok"]
        values = {
            "time to first token": [r["ttft"] for r in mine if r["ttft"] is not None],
            "inter-token latency": [g for r in mine for g in r["gaps"]],
            "end to end": [r["e2e"] for r in mine if r["e2e"] is not None],
        }
        for ax, (name, xs) in zip(axes, values.items(), strict=True):
            if xs:
                xs = sorted(x * 1000 for x in xs)
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label(point["load"]))
            ax.set_title(name)
            ax.set_xlabel("ms")
            ax.set_ylabel("share of requests (CDF)" if name != "inter-token latency" else "share of gaps (CDF)")
            ax.grid(alpha=0.3)
    axes[0].legend()
    return _save(fig, plt, out_dir, "latency.png")


def _series(plt: Any, results: dict[str, Any], out_dir: str) -> str:
    """Offered against achieved load and streams in flight, second by second, points one after another;
    below them, the server's own gauges and counters (--server-metrics) on the same seconds."""
    scraped = any("server_metrics" in p for p in results["points"])
    fig, axes = plt.subplots(4 if scraped else 2, 1, figsize=(12, 12 if scraped else 6), sharex=True)
    top, bottom = axes[:2]
    offset, starts = 0, []
    for point in results["points"]:
        starts.append(offset)
        rows = point["series"]
        xs = [offset + r["second"] for r in rows]
        top.plot(xs, [r["offered"] for r in rows], color="tab:gray", linestyle="--")
        top.plot(xs, [r["sent"] for r in rows], color="tab:blue")
        top.plot(xs, [r["completed"] for r in rows], color="tab:green")
        bottom.plot(xs, [r["in_flight"] for r in rows], color="tab:purple")
        if rows:
            top.axvline(offset, color="black", alpha=0.2)
            top.text(offset, 0, label(point["load"]), fontsize=8, va="bottom")
        offset += len(rows)
    top.legend(["offered (scheduled)", "sent", "completed"], loc="best")
    top.set_ylabel("requests per second")
    bottom.set_ylabel("streams in flight")
    if scraped:
        server_panels(axes[2], axes[3], results["points"], starts)
    axes[-1].set_xlabel("seconds")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, plt, out_dir, "series.png")


def _sweep(plt: Any, results: dict[str, Any], out_dir: str) -> str:
    points = results["points"]
    swept = load_kind(points[0]["load"]) or "rate"
    points = sorted(points, key=lambda p: p["load"].get(swept, 0))  # a search probes out of order
    xs = [p["load"][swept] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    left.plot(xs, [p["summary"]["throughput"]["output_tokens_per_s"] for p in points], marker="o")
    left.set_ylabel("output tokens/s")
    twin = left.twinx()
    twin.plot(xs, [p["summary"]["throughput"]["requests_per_s"] for p in points], marker="s", color="tab:orange")
    twin.set_ylabel("requests/s", color="tab:orange")
    for metric in ("ttft", "e2e"):
        for q, style in (("p50", "-"), ("p99", ":")):
            ys = [(p["summary"]["latency"][metric][q] or 0) * 1000 for p in points]
            right.plot(xs, ys, linestyle=style, marker="o", label=f"{metric} {q}")
    right.set_ylabel("ms")
    right.legend()
    for ax in (left, right):
        ax.set_xlabel(LOAD_KINDS[swept])
        ax.grid(alpha=0.3)
    left.set_title("throughput")
    right.set_title("latency")
    return _save(fig, plt, out_dir, "sweep.png")


def _search(plt: Any, results: dict[str, Any], out_dir: str) -> str:
    """Each probe's goodput against its load, passes and failures apart, with the bar and the answer."""
    found = results["search"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for number, point in enumerate(results["points"]):
        load, share = point["load"].get(found["over"]), point["summary"]["goodput"]["share"]
        passed = share >= found["goodput"]
        ax.plot(load, share * 100, marker="o" if passed else "x", color="tab:green" if passed else "tab:red")
        ax.annotate(str(number + 1), (load, share * 100), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(found["goodput"] * 100, color="black", linestyle=":", label=f"bar ({found['goodput']:.0%})")
    if found["answer"] is not None:
        ax.axvline(found["answer"], color="tab:green", alpha=0.4, label=f"answer ({found['answer']:g})")
    loads = sorted({point["load"].get(found["over"]) for point in results["points"]})
    ax.set_xscale("log")  # the probes grow and close in geometrically
    ax.set_xticks(loads, [f"{load:g}" for load in loads])
    ax.minorticks_off()
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel(LOAD_KINDS[found["over"]])
    ax.set_ylabel("requests meeting the SLO (%)")
    ax.set_title("--find-max: probes in the order run")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, plt, out_dir, "search.png")


def _save(fig: Any, plt: Any, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
