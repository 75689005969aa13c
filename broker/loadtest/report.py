"""What a load test shows and writes: the live display, the console summary, the CSV, and
results rebuilt from `records.jsonl` alone (`isopool loadtest report DIR`), which is what a
run killed half-way leaves behind."""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from typing import Any

import msgspec
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..cli.render import console
from .search import Search, conclude
from .servermetrics import csv_columns, describe, figures
from .summary import label, parse_slo, point_result, steady_window


class LoadProgress:
    """One progress line per load point on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, enabled: bool = True, every: float = 5.0) -> None:
        self.enabled, self.every = enabled, every
        self._progress: Progress | None = None
        self._task: Any = None
        self._label = ""
        self._tally: Counter[str] = Counter()
        self._sample: dict[str, Any] = {}
        self._total: int | None = None
        self._last_line = 0.0

    def __enter__(self) -> LoadProgress:
        if self.enabled and console.is_terminal:
            columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("{task.fields[note]}"))  # fmt: skip
            self._progress = Progress(*columns, console=console)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def note(self, text: str) -> None:
        if self.enabled:
            console.print(text, highlight=False)

    def point(self, label: str, total: int | None, seconds: float | None) -> None:
        self._label, self._total, self._tally = label, total, Counter()
        if self._progress is not None:
            self._task = self._progress.add_task(label, total=total, note=f"{seconds:g} s" if seconds else "")

    def record(self, record: dict[str, Any]) -> None:
        self._tally[record["outcome"]] += 1
        self._show()

    def sample(self, sample: dict[str, Any]) -> None:
        self._sample = sample
        self._show()

    def _show(self) -> None:
        done = sum(self._tally.values())
        s = self._sample
        note = f"ok {self._tally['ok']}  failed {done - self._tally['ok'] - self._tally['stall']}  "
        note += f"stalls {self._tally['stall']}"
        if s:
            note += f"  in flight {s['in_flight']}  {s['ticks_per_s']:.0f} reads/s  CPU {s['cpu_cores']:.2f} cores"
        if self._progress is not None:
            self._progress.update(self._task, completed=done, note=note)
        elif self.enabled and time.monotonic() - self._last_line >= self.every:
            self._last_line = time.monotonic()
            total = f"/{self._total}" if self._total else ""
            console.print(f"loadtest {self._label}: {done}{total} done, {note}", highlight=False, soft_wrap=True)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _cached(cache: dict[str, Any] | None) -> str:
    if not cache:
        return "not reported"
    share = "-" if cache["cached_share"] is None else f"{cache['cached_share']:.1%}"
    return f"{cache['cached_input_tokens']:,} ({share})"


def print_results(results: dict[str, Any], out_dir: str) -> None:
    """One column per load point (a sweep reads left to right), one row per figure."""
    points = results["points"]
    table = Table(title=f"isopool loadtest — {results['options']['target']}, {results['api']}")
    table.add_column("")
    for point in points:
        table.add_column(label(point["load"]), justify="right")

    def row(name: str, cell: Any) -> None:
        table.add_row(name, *(cell(p["summary"], p["generator"], p["summary"]["latency"]) for p in points))

    row("requests (warm-up left out)", lambda s, g, lat: f"{s['requests']} ({s['warmup_requests']})")
    row("ok / stalls / errors", lambda s, g, lat: f"{s['outcomes'].get('ok', 0)} / {s['stalls']['count']} / "
        f"{s['requests'] - s['outcomes'].get('ok', 0) - s['stalls']['count']}")  # fmt: skip
    row("requests/s", lambda s, g, lat: f"{s['throughput']['requests_per_s']:.1f}")
    row("output tokens/s", lambda s, g, lat: f"{s['throughput']['output_tokens_per_s']:,.0f}")
    row("chunks/s", lambda s, g, lat: f"{s['throughput']['chunks_per_s']:,.0f}")
    row("streams in flight (mean)", lambda s, g, lat: f"{g['in_flight_mean']:.1f}")
    for name, key in (("TTFT", "ttft"), ("TTFT from schedule", "ttft_from_schedule"), ("inter-token", "itl"),
                      ("time per output token", "tpot"), ("end to end", "e2e"),
                      ("end to end from schedule", "e2e_from_schedule")):  # fmt: skip
        row(f"{name} p50 / p99 ms", lambda s, g, lat, k=key: f"{_ms(lat[k]['p50'])} / {_ms(lat[k]['p99'])}")
    if any(p["summary"].get("cache") for p in points):
        row("cached input tokens (share)", lambda s, g, lat: _cached(s.get("cache")))
        row("TTFT cache hit / miss p50 ms", lambda s, g, lat: "-" if not s.get("cache") else
            f"{_ms(s['cache']['ttft_hit']['p50'])} / {_ms(s['cache']['ttft_miss']['p50'])}")  # fmt: skip
    row("generator CPU (cores)",
        lambda s, g, lat: "-" if g.get("cpu_cores_mean") is None else f"{g['cpu_cores_mean']:.2f}")  # fmt: skip
    console.print(table)
    _print_server_metrics(points)
    for point in results["points"]:
        s, g = point["summary"], point["generator"]
        head = f"{label(point['load'])}: "
        if "server_metrics" in point:
            colour = "yellow" if point["server_metrics"]["failed"] else "default"
            console.print(head + f"[{colour}]{escape(describe(point['server_metrics']))}[/]")
        if s["errors"]:
            console.print(head + "errors: " + escape(", ".join(f"{k} ×{v}" for k, v in s["errors"].items())))
        if s["stalls"]["count"]:
            after = Counter(s["stalls"]["after_tokens"])
            where = ", ".join(f"{n} after {t} tokens" for t, n in sorted(after.items()))
            console.print(head + f"stalls cut at the stale timeout: {where}")
        if s["goodput"]:
            console.print(head + f"goodput {s['goodput']['requests_per_s']:.2f} req/s "
                          f"({s['goodput']['share']:.0%} of requests) within {s['goodput']['slo']}")  # fmt: skip
        if s["window"]["note"]:
            console.print(head + f"[yellow]{escape(s['window']['note'])}[/]")
        colour = "yellow" if g["verdict"] != "the generator kept up" else "green"
        console.print(head + f"[{colour}]{escape(g['verdict'])}[/]")
        if point.get("nodes"):
            print_nodes(point)
    for line in results.get("search", {}).get("text", []):
        console.print(f"[bold]{escape(line)}[/]")
    pngs = sorted(name for name in os.listdir(out_dir) if name.endswith(".png")) if os.path.isdir(out_dir) else []
    console.print(
        f"results in {escape(out_dir)}/: " + ", ".join(["results.json", "records.jsonl", "results.csv", *pngs])
    )


def _print_server_metrics(points: list[dict[str, Any]]) -> None:
    """The target's own figures over each point's steady window (--server-metrics), a row per series."""
    rows: dict[str, dict[int, str]] = {}
    for number, point in enumerate(points):
        for key, text in figures(point.get("server_metrics") or {"window": {}, "histograms": {}}):
            rows.setdefault(key, {})[number] = text
    if not rows:
        return
    table = Table(title="the server's own metrics, steady window (all in results.json and results.csv)")
    table.add_column("")
    for point in points:
        table.add_column(label(point["load"]), justify="right")
    for key, cells in rows.items():
        table.add_row(escape(key), *(cells.get(number, "-") for number in range(len(points))))
    console.print(table)


def print_nodes(point: dict[str, Any]) -> None:
    """A point spread over Ray nodes: what each node offered and achieved, how well its clock was
    aligned with the driver's, and its generator's verdict."""
    table = Table(title=f"{label(point['load'])} by node", title_justify="left")
    for name in ("node", "load", "requests", "requests/s", "chunks/s", "in flight", "stalls", "clock ± ms",
                 "generator"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("node", "generator") else "right")
    for name, node in point["nodes"].items():
        s, g, clock = node["summary"], node["generator"], node.get("alignment")
        table.add_row(
            name, label(node["load"]), f"{s['requests']} ({s['warmup_requests']})",
            f"{s['throughput']['requests_per_s']:.1f}", f"{s['throughput']['chunks_per_s']:,.0f}",
            f"{g['in_flight_mean']:.1f}", str(s["stalls"]["count"]),
            "-" if clock is None else f"{clock['error_s'] * 1000:.2f} (drift {clock['drift_s'] * 1000:+.2f})",
            escape(g["verdict"]),
        )  # fmt: skip
    console.print(table)


def write_csv(results: dict[str, Any], path: str) -> None:
    """One row per point: the load, counts, throughput, and every latency percentile (seconds)."""
    rows = []
    for point in results["points"]:
        s = point["summary"]
        row: dict[str, Any] = {"load": label(point["load"]), "requests": s["requests"],
                               "ok": s["outcomes"].get("ok", 0), "stalls": s["stalls"]["count"],
                               **s["throughput"], "in_flight_mean": point["generator"]["in_flight_mean"],
                               "verdict": point["generator"]["verdict"]}  # fmt: skip
        cache = s.get("cache") or {}
        row |= {"cached_input_tokens": cache.get("cached_input_tokens"), "cached_share": cache.get("cached_share")}
        if s["goodput"]:
            row["goodput_share"] = s["goodput"]["share"]
        for metric, dist in s["latency"].items():
            row |= {f"{metric}_{k}": v for k, v in dist.items() if k != "n"}
        if "server_metrics" in point:
            row |= csv_columns(point["server_metrics"])
        rows.append(row)
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)


def read_records(out_dir: str) -> list[dict[str, Any]]:
    """Every complete record of `records.jsonl` (a killed run's torn last line is skipped)."""
    records = []
    with open(os.path.join(out_dir, "records.jsonl"), "rb") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def save_outputs(results: dict[str, Any], out_dir: str, quiet: bool = False) -> None:
    """results.csv and the PNG plots next to the records (plots need the `plots` extra)."""
    from . import plots

    write_csv(results, os.path.join(out_dir, "results.csv"))
    if plots.available():
        plots.write(results, read_records(out_dir), out_dir)
    elif not quiet:
        console.print(f"[yellow]no plots: matplotlib is not installed ({escape(plots.INSTALL)})[/]")


class DamagedRun(ValueError):
    """A run directory whose results.json or records.jsonl is not what a load test writes."""


def rebuild(out_dir: str) -> dict[str, Any]:
    """Results from `records.jsonl` (and the options in `results.json`, if the run got that far, with the
    server metrics scraped for each point it finished): what `isopool loadtest report` shows for a run
    that was killed. Torn last lines are skipped; anything else out of shape is a DamagedRun."""
    try:
        return _rebuild(out_dir)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise DamagedRun(f"{out_dir} holds a results.json or records.jsonl that no load test wrote "
                         f"({type(exc).__name__}: {str(exc)[:100]}): was it edited by hand?") from None  # fmt: skip


def _rebuild(out_dir: str) -> dict[str, Any]:
    records_path = os.path.join(out_dir, "records.jsonl")
    if not os.path.exists(records_path):
        raise FileNotFoundError(f"{records_path} does not exist: is {out_dir} a load test's output directory?")
    results: dict[str, Any] = {"options": {"target": "?", "slo": ""}, "api": "?", "points": []}
    saved = os.path.join(out_dir, "results.json")  # written (atomically) at the start and after each point
    finished: list[dict[str, Any]] = []
    if os.path.exists(saved):
        with open(saved) as f:
            results |= json.load(f)
        finished, results["points"] = results["points"], []
        results["finished_points"] = len(finished)
    by_point: dict[int, list[dict[str, Any]]] = {}
    for record in read_records(out_dir):
        by_point.setdefault(record["point"], []).append(record)
    loads = results.get("load_points", [])
    options = results["options"]
    slo = parse_slo(options.get("slo", ""))
    for number in sorted(by_point):
        load = loads[number] if number < len(loads) else {"name": f"point {number}"}
        window = steady_window(by_point[number], options.get("warmup"), options.get("duration"))
        point = point_result(load, by_point[number], [], [], slo, window=window)
        if number < len(finished) and "server_metrics" in finished[number]:  # scraped live: not in the records
            point["server_metrics"] = finished[number]["server_metrics"]
        if "ray" in results:  # a run spread over a Ray cluster's nodes: each node's share too
            from .distributed import rebuilt_nodes

            point["nodes"] = rebuilt_nodes(results, load, by_point[number], window)
        results["points"].append(point)
    if options.get("find_max"):  # concluded from the probes that ran to their end
        search = msgspec.convert(options["find_max"], Search)
        ended = [p for number, p in zip(sorted(by_point), results["points"], strict=True) if number < len(finished)]
        results["search"] = conclude(search, slo, ended)
    return results
