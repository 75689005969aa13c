"""The server's own series (--server-metrics) in `series.png`, under the generator's, on the same seconds."""

from __future__ import annotations

from typing import Any

_LINES = 8  # series per panel: more make a plot no one can read (results.json has them all)


def server_panels(gauges: Any, rates: Any, points: list[dict[str, Any]], starts: list[int]) -> None:
    """The server's gauges as they read, its counters as increases per second between two scrapes; the
    first `_LINES` of each (a histogram's _sum and _count left out), one colour per series."""
    colours = _server_colours(points)
    labelled: set[str] = set()
    for point, start in zip(points, starts, strict=True):
        metrics = point.get("server_metrics") or {"series": {}}
        ts = [start + t for t in metrics.get("t", [])]
        for key, values in metrics["series"].items():
            if key not in colours:
                continue
            name = key if key not in labelled else None
            labelled.add(key)
            if metrics["kinds"][key] == "gauge":
                gauges.plot(ts, values, color=colours[key], label=name)
            else:
                rates.plot(*_per_second(ts, values), color=colours[key], label=name)
    gauges.set_ylabel("server gauges")
    rates.set_ylabel("server counters, per second")
    for ax in (gauges, rates):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=7)


def _server_colours(points: list[dict[str, Any]]) -> dict[str, str]:
    """The series to draw, each with its colour: the first `_LINES` gauges and `_LINES` counters."""
    chosen: dict[str, dict[str, None]] = {"gauge": {}, "counter": {}}
    for metrics in (p["server_metrics"] for p in points if "server_metrics" in p):
        parts = {h.partition("{")[0] + part for h in metrics["histograms"] for part in ("_sum", "_count")}
        for key, kind in metrics["kinds"].items():
            if key.partition("{")[0] not in parts and len(chosen[kind]) < _LINES:
                chosen[kind][key] = None
    keys = [*chosen["gauge"], *chosen["counter"]]
    return {key: f"C{i % 10}" for i, key in enumerate(keys)}


def _per_second(ts: list[float], values: list[float | None]) -> tuple[list[float], list[float | None]]:
    """A counter's increase per second between consecutive scrapes, at their midpoints."""
    xs, ys = [], []
    for (a, y1), (b, y2) in zip(zip(ts, values, strict=True), zip(ts[1:], values[1:], strict=True), strict=False):
        xs.append((a + b) / 2)
        ys.append((y2 - y1) / (b - a) if y1 is not None and y2 is not None and b > a and y2 >= y1 else None)
    return xs, ys
