"""Terminal output of the CLI (rich): the stats table, the demo's and the batch's progress and summaries."""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from ..protocol import Snapshot, Tokens

console = Console()


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def print_stats(s: Snapshot) -> None:
    console.print(broker_line(s))
    console.print(workers_table(s))
    console.print(counters_table(s))
    if s.tokens:
        console.print(tokens_table(s))
    if s.tokens_by_caller:
        console.print(tokens_table(s, s.tokens_by_caller, "caller"))


def broker_line(s: Snapshot) -> str:
    return f"[bold]isopool broker[/] pid {s.pid} at {escape(s.frontend)}, up {s.uptime:.0f}s" + (
        " [yellow](draining)[/]" if s.draining else ""
    )


def workers_table(s: Snapshot, most: int | None = None) -> Table:
    """The broker's workers (the first `most` of them, if given)."""
    workers = Table(
        "worker", "pid", "state", "requests", "served", "age", "RSS", title=shown("workers", s.workers, most)
    )
    for w in s.workers[:most]:
        rss = f"{w.rss / 2**20:.0f} MB" if w.rss else "-"
        requests = ", ".join(map(str, w.requests)) or "-"
        workers.add_row(w.ident, str(w.pid or "-"), w.state, requests, str(w.served), f"{w.age:.0f}s", rss)
    return workers


def shown(title: str, rows: list, most: int | None) -> str:
    """A table's title, saying how many of its rows it shows when that is not all of them."""
    return title if most is None or most >= len(rows) else f"{title} ({most} of {len(rows)} shown)"


def counters_table(s: Snapshot) -> Table:
    counters = Table("", "", title="counters", show_header=False)
    counters.add_row("in flight / queued", f"{s.in_flight} / {_counts(s.queued)}")
    counters.add_row("requests", _counts(s.requests))
    counters.add_row("stalls detected", _counts(s.stalls))
    counters.add_row("workers killed", _counts(s.kills))
    counters.add_row("spawned / respawned", f"{s.spawns} / {s.respawns}")
    counters.add_row("retries", str(s.retries))
    counters.add_row("fallbacks (from>to)", escape(_counts(s.fallbacks)))
    counters.add_row("rescued", _counts(s.rescued))
    counters.add_row("continuations (strategy:outcome)", _counts(s.continuations))
    for key, c in sorted(s.circuits.items()):
        opened = f", opened {c.opened}x" + (f", probe in {c.until_in:.1f}s" if c.state == "open" else "")
        counters.add_row(f"circuit {escape(key)}", f"{c.state} ({c.failures} failures in a row{opened})")
    counters.add_row("rejected messages", _counts(s.rejected))
    if s.request_log_lost:
        counters.add_row("request log lines lost", f"[red]{s.request_log_lost}[/] (see the broker's log)")
    lat, first = s.latency, s.first_event
    counters.add_row("latency p50 / p99 (≤)", f"{_ms(lat.p50)} / {_ms(lat.p99)}")
    counters.add_row("first event p50 / p99 (≤)", f"{_ms(first.p50)} / {_ms(first.p99)}")
    return counters


def tokens_table(s: Snapshot, tallies: dict[str, Tokens] | None = None, by: str = "profile / model") -> Table:
    """Tokens the providers reported, by profile and the model that answered, or as `tallies` (by a gateway
    token's caller), and their cost, with `prices`."""
    priced = bool(s.prices)
    title = f"tokens by {by} (cost from {escape(s.prices)})" if priced else f"tokens by {by}"
    table = Table(by, "input", "cached read", "cache write", "output", "attempts",
                  *(["cost"] if priced else []), title=title)  # fmt: skip
    for key, t in sorted((s.tokens if tallies is None else tallies).items()):
        cost = [money(t.cost)] if priced else []
        table.add_row(escape(key.replace("/", " / ", 1)), f"{t.input:,}", f"{t.cache_read:,}", f"{t.cache_write:,}",
                      f"{t.output:,}", str(t.attempts), *cost)  # fmt: skip
    return table


def money(cost: float | None) -> str:
    """A cost with at least 3 significant digits (0.000311, not 0.0003) and at least cents; "—": no price."""
    if cost is None:
        return "—"
    decimals = 2 if cost <= 0 else min(9, max(2, 2 - math.floor(math.log10(cost))))
    return f"{cost:,.{decimals}f}"


def token_total(s: Snapshot) -> int:
    """Input and output tokens billed so far, over every profile and model."""
    return sum(t.input + t.output for t in s.tokens.values())


@contextlib.contextmanager
def demo_progress(total: int, enabled: bool = True) -> Iterator[Callable[[Counter], None]]:
    """A live progress bar; yields the callback the demo calls after each request."""
    from .demo import REASKED  # here, not at the top: the demo loads aiohttp and the pool, `stats` needs neither

    if not enabled:
        yield lambda tally: None
        return
    columns = (
        TextColumn("[bold]demo"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("requests", total=total, note="starting the fake provider and the pool…")

        def update(tally: Counter) -> None:
            done = sum(v for k, v in tally.items() if k != REASKED)
            note = f"ok {tally['ok']}  re-asked {tally[REASKED]}"
            progress.update(task, completed=done, note=note)

        yield update


def print_demo(s: dict[str, Any]) -> None:
    table = Table("", "", title="isopool demo summary", show_header=False)
    table.add_row("requests", str(s["requests"]))
    table.add_row("answered correctly", f"[green]{s['ok']}[/]")
    table.add_row("answered wrongly", f"[red]{s['wrong']}[/]" if s["wrong"] else "0")
    table.add_row("lost (no answer)", f"[red]{s['lost']}[/]" if s["lost"] else "0")
    table.add_row("failed with a typed error", _counts(s["failed"]))
    table.add_row("streams broken after output, re-asked", str(s["re_asked_after_broken_stream"]))
    table.add_row("faults injected", _counts(s["faults_injected"]))
    table.add_row("stalls detected", _counts(s["stalls_detected"]))
    table.add_row("workers killed", _counts(s["workers_killed"]))
    table.add_row("workers respawned", str(s["workers_respawned"]))
    table.add_row("transparent retries by the pool", str(s["pool_retries"]))
    table.add_row("latency p50 / p99", f"{_ms(s['latency_p50_s'])} / {_ms(s['latency_p99_s'])}")
    table.add_row("wall time (pool start-up)", f"{s['wall_s']} s ({s['startup_s']} s)")
    table.add_row("time lost to stalls", f"{s['time_lost_to_stalls_s']} s")
    table.add_row(
        "…with plain SDK calls", f"≥ {s['time_plain_sdk_would_lose_s']} s (keep-alives reset the SDK's read timeout)"
    )
    console.print(table)
    for example in s["failure_examples"]:
        console.print(f"[yellow]failure:[/] {escape(example)}")
    if s["lost"] or s["wrong"]:
        console.print("[red]requests were lost or answered wrongly[/]")
    elif s["failed"]:
        failed = sum(s["failed"].values())
        console.print(
            f"[yellow]nothing lost and no wrong answer; {failed} of {s['requests']} ended in a typed error (above): "
            f"the faults drawn for {'it' if failed == 1 else 'each'} outlasted its retries, and the error says "
            "which, as your code would be told[/]"
        )
    else:
        console.print("[green]nothing lost: every request answered, every answer correct[/]")


class BatchProgress:
    """The batch's live display: a progress bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, enabled: bool = True, every: float = 5.0) -> None:
        self.enabled, self.every = enabled, every
        self.tally: Counter[str] = Counter()
        self.todo = 0
        self._progress: Progress | None = None
        self._task: Any = None
        self._last_line = 0.0
        self._started = 0.0
        self._status = ""

    def __enter__(self) -> BatchProgress:
        if self.enabled and console.is_terminal:
            columns = (TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[note]}"))  # fmt: skip
            self._progress = Progress(*columns, console=console)
            self._progress.__enter__()
            self._task = self._progress.add_task("batch", total=None, note="validating and starting the pool…")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, todo: int) -> None:
        self.todo, self._started = todo, time.monotonic()
        if self._progress is not None:
            self._progress.update(self._task, total=todo)

    def status(self, status: dict[str, Any]) -> None:
        self._status = (
            f"  concurrency {status['concurrency']}  stalls recovered {status['stalls']}  re-sent {status['resent']}"
        )
        if nodes := status.get("nodes"):  # on Ray: what each node has done
            shares = [f"{name} {_node_share(n)}" for name, n in nodes.items()]
            self._status += "  nodes: " + "; ".join(shares)

    def result(self, record: dict[str, Any]) -> None:
        from ..batch.formats import is_ok

        self.tally["ok" if is_ok(record) else "failed"] += 1
        done = self.tally["ok"] + self.tally["failed"]
        elapsed = max(1e-9, time.monotonic() - self._started)
        rate = done / elapsed
        eta = (self.todo - done) / rate if rate else 0
        note = f"ok {self.tally['ok']}  failed {self.tally['failed']}  {rate:.1f}/s  ETA {eta:.0f}s{self._status}"
        if self._progress is not None:
            self._progress.update(self._task, completed=done, note=note)
        elif self.enabled and (time.monotonic() - self._last_line >= self.every or done == self.todo):
            self._last_line = time.monotonic()
            console.print(f"batch: {done}/{self.todo} done, {note}", highlight=False, soft_wrap=True)


def _node_share(n: dict[str, Any]) -> str:
    """One node in the progress line: what it has done, its failures and stalls, or that it is lost."""
    if n["lost"]:
        return "lost"
    parts = [f"{n['done']} done"]
    if n["failed"]:
        parts.append(f"{n['failed']} failed")
    if n["stalls_recovered"]:
        parts.append(f"{n['stalls_recovered']} stalls")
    return ", ".join(parts)


def _print_nodes(nodes: dict[str, dict[str, Any]]) -> None:
    table = Table(Column("node", no_wrap=True), "done", "ok", "failed", "stalls recovered", "pool retries", "state",
                  title="per node")  # fmt: skip
    for name, n in nodes.items():
        table.add_row(escape(name), str(n["done"]), str(n["ok"]), str(n["failed"]), str(n["stalls_recovered"]),
                      str(n["retries"]), "[red]lost[/]" if n["lost"] else "up")  # fmt: skip
    console.print(table)
    for name, n in nodes.items():
        if n["lost"]:
            after = "" if n["recovered_s"] is None else f"; its lines answered elsewhere {n['recovered_s']} s later"
            console.print(f"[red]lost[/] {escape(name)}: {escape(n['error'])}{after}", soft_wrap=True)


def print_batch(s: dict[str, Any], output: str) -> None:
    table = Table("", "", title="isopool batch summary", show_header=False)
    table.add_row("lines in the input", str(s["total"]))
    table.add_row("already done (earlier run)", str(s["already_done"]))
    table.add_row("succeeded", f"[green]{s['ok']}[/]")
    table.add_row("failed", f"[red]{s['failed']}[/]" if s["failed"] else "0")
    table.add_row("failures by kind", _counts(s["errors"]))
    table.add_row("invalid lines", str(s["invalid"]))
    table.add_row("stalls recovered / pool retries", f"{s['stalls_recovered']} / {s['retries']}")
    if s["throttled"]:
        table.add_row("throttled (429/529) / re-sent", f"{s['throttled']} / {s['batch_retries']}")
        table.add_row("lowest concurrency", str(s["lowest_concurrency"]))
    if tokens := s.get("tokens"):
        table.add_row("tokens in / out (cache read, write)", f"{tokens['input']:,} / {tokens['output']:,} "
                      f"({tokens['cache_read']:,}, {tokens['cache_write']:,})")  # fmt: skip
    table.add_row("wall time, rate", f"{s['wall_s']} s, {s['per_s']}/s")
    if s["repaired_bytes"]:
        table.add_row("torn last line repaired", f"{s['repaired_bytes']} bytes cut")
    if s["rerun_changed"]:
        table.add_row("request changed, run again", f"[yellow]{s['rerun_changed']}[/] (old results replaced)")
    if s["nodes"]:
        lost = sum(n["lost"] for n in s["nodes"].values())
        table.add_row("Ray nodes (lost)", f"{len(s['nodes'])} ({lost})")
        warn = "[yellow]{}[/] (each may have been paid twice)" if s["reexecuted"] else "{}"
        table.add_row("run again after a node was lost", warn.format(s["reexecuted"]))
    console.print(table)
    if s["nodes"]:
        _print_nodes(s["nodes"])
    console.print(f"results: {escape(output)} ({s['format']} batch result format)")
