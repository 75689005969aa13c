"""Running a batch file through the pool, exactly once per custom_id, resumable.

    from broker.batch import run
    summary = run("requests.jsonl", "results.jsonl")      # or iter_results(...) for each result

Validation comes first: every problem is reported with its line number and nothing is
sent (or, with `skip_invalid`, invalid lines are written as errored results). Ids that
already have a result in the output (a run that was killed) are skipped, if their request
is the one this input has (else InputChanged, see the ledger). Every other line gets
exactly one result line, written as soon as its answer is in; if a write fails (a full
disk), no more lines are sent, those in flight are cancelled, and OutputWriteFailed says
how to go on.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from ..client.client import AsyncClient
from ..client.pool import Pool
from .cluster import NodeStats, RayOptions, require_ray, run_on_ray
from .execute import Counters, Settler, estimate_tokens, stalls_between
from .formats import (
    Format,
    Invalid,
    Item,
    duplicate,
    error_kind,
    failed,
    fingerprint,
    is_ok,
    numbered_lines,
    parse_line,
    tokens_of,
)
from .lane import Lane
from .ledger import Ledger


class BatchInputError(ValueError):
    """The input has invalid lines; `problems` lists them with their line numbers."""

    def __init__(self, path: str, problems: list[Invalid]) -> None:
        self.problems = problems
        lines = [f"{path}:{p.line}: {p.reason}" for p in problems[:50]]
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(
            f"{len(problems)} invalid line(s); nothing was sent (use --skip-invalid to write them as errors):\n"
            + "\n".join(lines)
            + more
        )


class BatchOptionError(BatchInputError):
    """An option out of range, named as on the command line and from Python. A BatchInputError, so that the
    command line refuses it as it does invalid input (exit 2), before anything runs."""

    def __init__(self, name: str, allowed: str, value: Any) -> None:
        self.problems: list[Invalid] = []
        option = "--" + name.replace("_", "-")
        ValueError.__init__(self, f"{option} ({name}= from Python) must be {allowed}, got {value!r}; nothing was sent")


def check_options(concurrency: int | None = None, retry_budget: int = 0, rpm: int = 0, tpm: int = 0) -> None:
    """Refuse an option out of range before anything runs (a negative rpm broke the lane mid-run, a negative
    concurrency or budget was taken silently)."""
    if concurrency is not None and concurrency < 1:
        raise BatchOptionError("concurrency", "1 or more", concurrency)
    for name, value, allowed in (("retry_budget", retry_budget, "0 or more"), ("rpm", rpm, "0 or more (0: no ceiling)"),
                                 ("tpm", tpm, "0 or more (0: no ceiling)")):  # fmt: skip
        if value < 0:
            raise BatchOptionError(name, allowed, value)


TOKEN_TYPES = ("input", "output", "cache_read", "cache_write")


class Summary(msgspec.Struct):
    total: int = 0  # lines in the input
    already_done: int = 0  # had a result from an earlier run
    invalid: int = 0
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = {}
    stalls_recovered: int = 0
    retries: int = 0  # the pool's transparent retries
    throttled: int = 0  # 429/529 answers after the pool's retries
    batch_retries: int = 0  # throttled requests sent again by the runner
    lowest_concurrency: int = 0
    wall_s: float = 0.0
    per_s: float = 0.0
    format: str = ""
    repaired_bytes: int = 0
    # on a Ray cluster (`ray=`): each node's share, and the items dealt again after a node was lost
    nodes: dict[str, NodeStats] = {}
    reexecuted: int = 0  # each may have reached the provider twice (and been paid twice)
    rerun_changed: int = 0  # done ids whose request changed, run again (`rerun_changed`)
    # tokens the succeeded answers report (input counts cached ones too); the pool's stats also bill failed attempts.
    # None for a job: its result is the function's, whose calls' usage only the pool's stats and request log hold
    tokens: dict[str, int] | None = msgspec.field(default_factory=lambda: dict.fromkeys(TOKEN_TYPES, 0))

    def count(self, record: dict[str, Any]) -> None:
        """Tally one result line, by kind of failure."""
        if is_ok(record):
            self.ok += 1
            if self.tokens is not None:
                for kind, count in zip(TOKEN_TYPES, tokens_of(record) or (), strict=False):
                    self.tokens[kind] += count
        else:
            self.failed += 1
            kind = error_kind(record)
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def finish(self, started: float) -> Summary:
        self.wall_s = round(time.monotonic() - started, 3)
        self.per_s = round((self.ok + self.failed) / self.wall_s, 1) if self.wall_s else 0.0
        return self


def load(path: str, fmt: Format | None = None) -> tuple[list[Item], list[Invalid], Format | None]:
    """Parse and validate every line: (items, invalid lines, format)."""
    items: list[Item] = []
    invalid: list[Invalid] = []
    first_seen: dict[str, int] = {}
    for number, raw in numbered_lines(path):
        parsed, fmt = parse_line(number, raw, fmt)
        if isinstance(parsed, Item) and parsed.custom_id in first_seen:
            parsed = duplicate(number, parsed.custom_id, first_seen[parsed.custom_id])
        elif isinstance(parsed, Item | Invalid) and parsed.custom_id:
            first_seen.setdefault(parsed.custom_id, number)
        (items if isinstance(parsed, Item) else invalid).append(parsed)  # type: ignore[arg-type]
    return items, invalid, fmt


async def _run(
    url: str, items: list[Item], ledger: Ledger, concurrency: int | None, on_result: Callable[[dict[str, Any]], None],
    on_start: Callable[[int], None], retry_budget: int, rpm: int, tpm: int,
    on_status: Callable[[dict[str, Any]], None],
) -> Counters:  # fmt: skip
    """Feed items to the pool under the lane's adaptive limit. Returns counters for the summary."""
    async with AsyncClient(url) as client:
        before = await client.snapshot()
        # default: as many in flight as the provider's workers can carry (max_workers x concurrency)
        lane = Lane(concurrency or before.capacity.get(items[0].kind, 32), rpm, tpm)
        settle = Settler(client, lane, retry_budget)
        on_start(len(items))

        async def report() -> None:
            """What the live display shows besides the counts: concurrency, re-sends, stalls."""
            while True:
                await asyncio.sleep(1.0)
                stalls = stalls_between(before, await client.snapshot())
                on_status({"concurrency": int(lane.limit), "resent": settle.batch_retries, "stalls": stalls})

        async def process(item: Item) -> None:
            record = await settle(item, holding=True)
            ledger.write(record)
            on_result(record)

        reporter = asyncio.create_task(report())
        try:
            await _feed(items, lane, process, tpm)
        finally:
            reporter.cancel()
        return settle.counters(before, await client.snapshot())


async def _feed(items: list[Item], lane: Lane, process: Callable[[Item], Any], tpm: int) -> None:
    """Start each item when the lane lets it; the first one that fails (its result could not be
    written) stops the feeding and cancels those in flight, and its error is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            for item in items:
                await lane.acquire(estimate_tokens(item) if tpm else 0)
                group.create_task(process(item))
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None


def run(
    input_path: str,
    output_path: str,
    *,
    pool: Pool | str | None = None,
    fmt: Format | None = None,
    concurrency: int | None = None,
    retry_budget: int = 5,
    rpm: int = 0,
    tpm: int = 0,
    skip_invalid: bool = False,
    rerun_changed: bool = False,
    on_result: Callable[[dict[str, Any]], None] = lambda record: None,
    on_start: Callable[[int], None] = lambda todo: None,
    on_status: Callable[[dict[str, Any]], None] = lambda status: None,
    ray: RayOptions | str | None = None,
) -> Summary:
    """Run the batch and return its summary. Raises before sending anything: BatchInputError for
    invalid lines (BatchOptionError for an option out of range), and a BatchOutputError (from the
    ledger) when another run writes the output, when it is the input, not a regular file or damaged,
    or when it holds results for ids whose request in this input is different (with
    `rerun_changed`, those are run again instead); OutputWriteFailed when a result cannot be written.

    With `ray` (a cluster address such as "auto", or `RayOptions`), the items run on one
    pool per node of that Ray cluster instead of `pool`; this process still writes the output."""
    started = time.monotonic()
    check_options(concurrency, retry_budget, rpm, tpm)
    if ray is not None:
        ray = RayOptions(address=ray) if isinstance(ray, str) else ray
        refused = {"pool": pool, "concurrency": concurrency, "rpm": rpm, "tpm": tpm}
        if given := [name for name, value in refused.items() if value]:
            raise ValueError(f"{', '.join(given)} cannot be used with ray (each node runs its own pool; "
                             "see RayOptions.per_node_concurrency)")  # fmt: skip
        require_ray()  # before the output file is touched
    items, invalid, fmt = load(input_path, fmt)
    if invalid and not skip_invalid:
        raise BatchInputError(input_path, invalid)
    summary = Summary(total=len(items) + len(invalid), invalid=len(invalid), format=fmt or "")

    def count(record: dict[str, Any]) -> None:
        summary.count(record)
        on_result(record)

    ledger = Ledger(output_path, source=input_path)
    try:
        summary.repaired_bytes = ledger.repaired
        summary.rerun_changed = len(ledger.match_input(_fingerprints(items, invalid), input_path, rerun_changed))
        for bad in invalid:  # with skip_invalid: an errored result each, never silently dropped
            custom_id = _invalid_id(bad)
            if custom_id is not None and custom_id not in ledger.done:
                record = failed(bad, "invalid", f"line {bad.line}: {bad.reason}", fmt or "openai")
                ledger.write(record)
                count(record)
        todo = [item for item in items if item.custom_id not in ledger.done]
        summary.already_done = len(items) - len(todo)
        if todo and ray is not None:
            counters, summary.nodes, summary.reexecuted = run_on_ray(
                ray, todo, ledger, retry_budget, count, on_start, on_status
            )
        elif todo:
            counters = with_pool(
                pool,
                lambda url: asyncio.run(
                    _run(url, todo, ledger, concurrency, count, on_start, retry_budget, rpm, tpm, on_status)
                ),
            )
        if todo:
            summary.stalls_recovered, summary.retries = counters.stalls, counters.retries
            summary.throttled, summary.batch_retries = counters.throttled, counters.batch_retries
            summary.lowest_concurrency = counters.lowest_concurrency
    finally:
        ledger.close()
    return summary.finish(started)


def _invalid_id(bad: Invalid) -> str | None:
    """The id an invalid line's errored result is written under (None: a duplicate, reported, not written)."""
    return None if bad.reason.startswith("duplicate") else bad.custom_id or f"line-{bad.line}"


def _fingerprints(items: list[Item], invalid: list[Invalid]) -> dict[str, str]:
    """custom_id -> fingerprint of its line, in input order: what each result will answer."""
    ids = {item.line: (item.custom_id, item) for item in items}
    ids.update((bad.line, (custom_id, bad)) for bad in invalid if (custom_id := _invalid_id(bad)) is not None)
    return {custom_id: fingerprint(line) for _, (custom_id, line) in sorted(ids.items())}


def with_pool(pool: Pool | str | None, use: Callable[[str], Any]) -> Any:
    """Run `use(url)` against the named pool, `$ISOPOOL_URL`, or an embedded pool for this run."""
    if isinstance(pool, Pool):
        return use(pool.url)
    if pool or os.environ.get("ISOPOOL_URL"):
        return use(pool or os.environ["ISOPOOL_URL"])
    with Pool() as embedded:
        return use(embedded.url)


def iter_results(input_path: str, output_path: str, **options: Any) -> Iterator[dict[str, Any]]:
    """Each result line as it is written (the run happens in a background thread)."""
    import queue
    import threading

    results: queue.SimpleQueue[Any] = queue.SimpleQueue()
    end = object()
    outcome: list[Any] = []

    def work() -> None:
        try:
            outcome.append(run(input_path, output_path, on_result=results.put, **options))
        except BaseException as exc:  # handed to the iterating thread
            outcome.append(exc)
        results.put(end)

    threading.Thread(target=work, name="isopool-batch", daemon=True).start()
    while (record := results.get()) is not end:
        yield record
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
