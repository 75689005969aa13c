"""`isopool loadtest compare DIR DIR...`: load tests side by side, point by point.

Each run is rebuilt from its records as `isopool loadtest report` does (`report.rebuild`), so a run
killed half-way compares as well as a finished one, and every run's figures come from the same
code. Points are matched by their load (the same concurrency, or the same rate); runs of different
kinds (a concurrency sweep and a rate sweep) or with no load in common with the first are refused.
Every later run is set against the first: the difference, absolute and in per cent, coloured by
whether it is better (more throughput; less latency, fewer stalls and errors) or worse."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

from rich.markup import escape
from rich.table import Table

from ..cli.render import console
from .report import DamagedRun, rebuild
from .summary import LOAD_KINDS, label, load_kind


class CompareError(ValueError):
    """Runs that cannot be compared, with what to do."""


class Metric(NamedTuple):
    key: str  # in the JSON
    title: str  # in the table
    better: int  # +1: more is better; -1: less is better
    value: Callable[[dict[str, Any]], float | None]  # from a point's summary
    digits: int


def _ms(metric: str, q: str) -> Callable[[dict[str, Any]], float | None]:
    def value(s: dict[str, Any]) -> float | None:
        seconds = s["latency"][metric][q]
        return None if seconds is None else round(seconds * 1000, 3)

    return value


def _errors(s: dict[str, Any]) -> int:
    return s["requests"] - s["outcomes"].get("ok", 0) - s["stalls"]["count"]


METRICS = (
    Metric("requests_per_s", "requests/s", 1, lambda s: s["throughput"]["requests_per_s"], 2),
    Metric("output_tokens_per_s", "output tokens/s", 1, lambda s: s["throughput"]["output_tokens_per_s"], 0),
    *(Metric(f"{m}_{q}_ms", f"{title} {q} ms", -1, _ms(m, q), 1)
      for m, title in (("ttft", "TTFT"), ("itl", "inter-token"), ("e2e", "end to end")) for q in ("p50", "p99")),
    Metric("goodput_per_s", "goodput req/s", 1, lambda s: s["goodput"]["requests_per_s"] if s["goodput"] else None, 2),
    Metric("stalls", "stalls", -1, lambda s: s["stalls"]["count"], 0),
    Metric("errors", "errors", -1, _errors, 0),
)  # fmt: skip


def _load_key(load: dict[str, Any]) -> tuple[str, float] | None:
    kind = load_kind(load)
    return None if kind is None else (kind, load[kind])


def _read(directory: str) -> dict[str, Any]:
    """A run rebuilt from its records; CompareError if there is nothing to compare in it."""
    try:
        results = rebuild(directory)
    except FileNotFoundError:
        raise CompareError(f"{directory} holds no load test (no records.jsonl): give the output directories "
                           "of `isopool loadtest` runs") from None  # fmt: skip
    except DamagedRun as exc:
        raise CompareError(str(exc)) from None
    if not results["points"]:
        raise CompareError(f"{directory} has no request records yet: nothing to compare")
    if any(_load_key(p["load"]) is None for p in results["points"]):
        raise CompareError(f"{directory} has no results.json saying what load its points ran at: they cannot be "
                           "matched")  # fmt: skip
    return results


def compare(directories: list[str]) -> dict[str, Any]:
    """The comparison: the runs, and per load point (in the first run's order, then the others') each
    metric's values, and each later run's difference from the first (None where either is missing)."""
    if len(directories) < 2:
        raise CompareError("give two or more load test directories to compare")
    runs = [_read(d) for d in directories]
    kinds = [_load_key(r["points"][0]["load"])[0] for r in runs]  # type: ignore[index]
    if len(set(kinds)) > 1:
        described = ", ".join(f"{d} ({k})" for d, k in zip(directories, kinds, strict=True))
        raise CompareError(f"these runs swept different loads, so their points cannot be matched: {described}")
    by_key = [{_load_key(p["load"]): p for p in r["points"]} for r in runs]
    for directory, points in zip(directories[1:], by_key[1:], strict=True):
        if not points.keys() & by_key[0].keys():
            raise CompareError(f"{directory} ran at no {kinds[0]} that {directories[0]} ran at "
                               f"({_loads(points)} against {_loads(by_key[0])}): nothing to match")  # fmt: skip
    keys = list(dict.fromkeys(k for points in by_key for k in points))
    return {
        "runs": [_run_info(d, r) for d, r in zip(directories, runs, strict=True)],
        "kind": kinds[0],
        "points": [_point(key, [points.get(key) for points in by_key]) for key in keys],
    }


def _loads(points: dict[Any, dict[str, Any]]) -> str:
    return ", ".join(label(p["load"]) for p in points.values())


def _run_info(directory: str, results: dict[str, Any]) -> dict[str, Any]:
    options = results["options"]
    planned = len(results.get("load_points", [])) or len(results["points"])
    return {"dir": directory, "name": os.path.basename(os.path.normpath(directory)), "target": options["target"],
            "api": results["api"], "slo": options.get("slo", ""), "points": len(results["points"]),
            "planned_points": planned, "finished": results.get("finished_points", planned) >= planned}  # fmt: skip


def _point(key: tuple[str, float], points: list[dict[str, Any] | None]) -> dict[str, Any]:
    load = next(p["load"] for p in points if p is not None)
    metrics = {}
    for metric in METRICS:
        values = [None if p is None else metric.value(p["summary"]) for p in points]
        if all(v is None for v in values):
            continue
        first = values[0]
        diffs = [None if v is None or first is None else round(v - first, 3) for v in values]
        pcts = [None if d is None or not first else round(100 * d / first, 1) for d in diffs]
        metrics[metric.key] = {"values": values, "diff": [None, *diffs[1:]], "pct": [None, *pcts[1:]]}
    return {"load": load, "label": label(load), "in": [p is not None for p in points], "metrics": metrics}


def print_comparison(comparison: dict[str, Any]) -> None:
    """One table: a section per load point, a row per metric; each later run with its difference."""
    runs = comparison["runs"]
    table = Table(title="isopool loadtest compare — each run against " + escape(runs[0]["name"]))
    table.add_column("load")
    table.add_column("")
    table.add_column(escape(_heading(runs[0])), justify="right")
    for run in runs[1:]:
        table.add_column(escape(_heading(run)), justify="right")
        table.add_column("difference", justify="right")
    metrics = {m.key: m for m in METRICS}
    for point in comparison["points"]:
        for n, (key, figures) in enumerate(point["metrics"].items()):
            metric = metrics[key]
            cells = [_number(figures["values"][0], metric.digits)]
            for i in range(1, len(runs)):
                cells += [_number(figures["values"][i], metric.digits), _difference(metric, figures, i)]
            last = n == len(point["metrics"]) - 1
            table.add_row(point["label"] if n == 0 else "", metric.title, *cells, end_section=last)
    console.print(table)
    for run in runs:
        if not run["finished"]:
            console.print(f"[yellow]{escape(run['name'])}: killed or still running, {run['points']} of its "
                          f"{run['planned_points']} points rebuilt from its records[/]")  # fmt: skip
    if len({run["slo"] for run in runs}) > 1:
        console.print("[yellow]the runs set different SLOs: " + escape(", ".join(
            f"{r['name']}: {r['slo'] or 'none'}" for r in runs)) + "[/]")  # fmt: skip


def _heading(run: dict[str, Any]) -> str:
    return run["name"] + ("" if run["finished"] else " (killed)")


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _difference(metric: Metric, figures: dict[str, Any], i: int) -> str:
    diff, pct = figures["diff"][i], figures["pct"][i]
    if diff is None:
        return "-"
    text = f"{diff:+,.{metric.digits}f}" + (f" ({pct:+.1f}%)" if pct is not None else "")
    if diff == 0:
        return text
    return f"[{'green' if diff * metric.better > 0 else 'red'}]{text}[/]"


# plot file -> its panels: (metric key, title), and the lines of each run: (key suffix, line style)
_PLOTS = {
    "compare-throughput.png": ((("requests_per_s", "requests/s"), ("output_tokens_per_s", "output tokens/s")),
                               (("", "-"),)),
    "compare-latency.png": ((("ttft", "TTFT ms"), ("itl", "inter-token ms"), ("e2e", "end to end ms")),
                            (("_p50_ms", "-"), ("_p99_ms", ":"))),
}  # fmt: skip


def write_plots(comparison: dict[str, Any], out_dir: str) -> list[str]:
    """compare-throughput.png and compare-latency.png (p50 solid, p99 dotted): each run's figures
    against the load, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import _save

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, (panels, lines) in _PLOTS.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
        for ax, (key, title) in zip(axes, panels, strict=True):
            for i, run in enumerate(comparison["runs"]):
                for suffix, style in lines:
                    name_of_line = f"{run['name']} {suffix[1:4]}".strip()
                    ax.plot(*_line(comparison, key + suffix, i), linestyle=style, marker="o", color=f"C{i}",
                            label=name_of_line)  # fmt: skip
            ax.set_title(title)
            ax.set_xlabel(LOAD_KINDS[comparison["kind"]])
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        written.append(_save(fig, plt, out_dir, name))
    return written


def _line(comparison: dict[str, Any], key: str, run: int) -> tuple[list[float], list[float]]:
    """(load, value) of one run's points that have the metric."""
    pairs = [(_load_key(p["load"])[1], p["metrics"][key]["values"][run]) for p in comparison["points"]  # type: ignore[index]
             if key in p["metrics"] and p["metrics"][key]["values"][run] is not None]  # fmt: skip
    pairs.sort()
    return [x for x, _ in pairs], [y for _, y in pairs]
