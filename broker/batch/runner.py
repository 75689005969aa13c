"""Running a batch file through the pool, exactly once per custom_id, resumable.

    from broker.batch import run
    summary = run("requests.jsonl", "results.jsonl")      # or iter_results(...) for each result

Validation comes first: every problem is reported with its line number and nothing is
sent (or, with `skip_invalid`, invalid lines are written as errored results). Ids that
already have a result in the output (a run that was killed) are skipped. Every other
line gets exactly one result line, written as soon as its answer is in.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from ..client import AsyncClient
from ..errors import IsopoolError, ProviderStatusError
from ..pool import Pool
from .formats import (
    Format,
    Invalid,
    Item,
    duplicate,
    failed,
    numbered_lines,
    parse_line,
    provider_failed,
    succeeded,
)  # fmt: skip
from .lane import Lane
from .ledger import Ledger

_DEC = msgspec.json.Decoder()
_ENC = msgspec.json.Encoder()


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


class Summary(msgspec.Struct):
    total: int = 0  # lines in the input
    already_done: int = 0  # had a result from an earlier run
    invalid: int = 0
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = {}
    stalls_recovered: int = 0
    retries: int = 0  # the pool's transparent retries
    throttled: int = 0  # 429/529 answers after the SDK's own retries
    batch_retries: int = 0  # throttled requests sent again by the runner
    lowest_concurrency: int = 0
    wall_s: float = 0.0
    per_s: float = 0.0
    format: str = ""
    repaired_bytes: int = 0

    def count(self, record: dict[str, Any]) -> None:
        """Tally one result line, by kind of failure."""
        if is_ok(record):
            self.ok += 1
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


THROTTLED = (429, 529)


async def _one(client: AsyncClient, item: Item) -> tuple[dict[str, Any], float | None]:
    """Run one item: its result line, and the retry-after if the provider throttled it."""
    try:
        call = await client.submit(item.kind, item.method, **item.params)
        result = await call.result()
        return succeeded(item, result.status, result.headers, _DEC.decode(result.body)), None
    except ProviderStatusError as exc:
        info = exc.info
        body = _DEC.decode(info.body) if info.body else {"message": info.message}
        record = provider_failed(item, info.status or 0, info.headers, body)
        return record, _retry_after(info.headers) if info.status in THROTTLED else None
    except IsopoolError as exc:
        return failed(item, str(getattr(exc, "code", "error")), str(exc), item.kind), None


def estimate_tokens(item: Item) -> int:
    """Input (about 4 bytes a token) plus the output the request allows: what a tpm limit counts."""
    params = item.params
    output = params.get("max_tokens") or params.get("max_completion_tokens") or params.get("max_output_tokens") or 0
    return len(_ENC.encode(params)) // 4 + int(output)


def _retry_after(headers: list[tuple[str, str]]) -> float:
    for key, value in headers:
        if key.lower() == "retry-after":
            try:
                return min(60.0, max(0.0, float(value)))
            except ValueError:
                return 1.0
    return 1.0


async def _run(
    url: str, items: list[Item], ledger: Ledger, concurrency: int | None, on_result: Callable[[dict[str, Any]], None],
    on_start: Callable[[int], None], retry_budget: int, rpm: int, tpm: int,
    on_status: Callable[[dict[str, int]], None],
) -> dict[str, Any]:  # fmt: skip
    """Feed items to the pool under the lane's adaptive limit; a throttled item goes back in
    the queue until its retry budget is spent. Returns counters for the summary."""
    queue = collections.deque((item, 0) for item in items)
    remaining = len(items)
    wake = asyncio.Event()
    counters = {"batch_retries": 0, "throttled": 0}
    tasks: set[asyncio.Task] = set()
    async with AsyncClient(url) as client:
        before = await client.stats()
        stalls_before = sum(before["stalls"].values())
        # default: as many in flight as the provider's workers can carry (max_workers x concurrency)
        lane = Lane(concurrency or before.get("capacity", {}).get(items[0].kind, 32), rpm, tpm)
        on_start(len(items))

        async def report() -> None:
            """What the live display shows besides the counts: concurrency, re-sends, stalls."""
            while True:
                await asyncio.sleep(1.0)
                stalls = sum((await client.stats())["stalls"].values()) - stalls_before
                on_status({"concurrency": int(lane.limit), "resent": counters["batch_retries"], "stalls": stalls})

        reporter = asyncio.create_task(report())

        async def process(item: Item, attempt: int) -> None:
            nonlocal remaining
            record, retry_after = await _one(client, item)
            await lane.release(retry_after is not None, retry_after or 0.0)
            if retry_after is not None:
                counters["throttled"] += 1
                if attempt < retry_budget:
                    counters["batch_retries"] += 1
                    queue.append((item, attempt + 1))
                    wake.set()
                    return
            ledger.write(record)
            on_result(record)
            remaining -= 1
            wake.set()

        while remaining:
            if not queue:
                await wake.wait()
                wake.clear()
                continue
            item, attempt = queue[0]
            await lane.acquire(estimate_tokens(item) if tpm else 0)
            queue.popleft()
            task = asyncio.create_task(process(item, attempt))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        reporter.cancel()
        after = await client.stats()
    return {
        "stalls": sum(after["stalls"].values()) - sum(before["stalls"].values()),
        "retries": after["retries"] - before["retries"],
        "lowest_concurrency": lane.lowest,
        **counters,
    }


def is_ok(record: dict[str, Any]) -> bool:
    if "result" in record:
        return record["result"]["type"] == "succeeded"
    response = record.get("response")
    return bool(response) and 200 <= response["status_code"] < 300


def error_kind(record: dict[str, Any]) -> str:
    if "result" in record:  # Anthropic's nested error object, or a job's exception
        error = record["result"].get("error") or {}
        return (error.get("error") or error).get("type", "error")
    if record.get("error"):
        return str(record["error"].get("code"))
    return f"http {record['response']['status_code']}"


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
    on_result: Callable[[dict[str, Any]], None] = lambda record: None,
    on_start: Callable[[int], None] = lambda todo: None,
    on_status: Callable[[dict[str, int]], None] = lambda status: None,
) -> Summary:
    """Run the batch and return its summary; raises BatchInputError before sending anything."""
    started = time.monotonic()
    items, invalid, fmt = load(input_path, fmt)
    if invalid and not skip_invalid:
        raise BatchInputError(input_path, invalid)
    summary = Summary(total=len(items) + len(invalid), invalid=len(invalid), format=fmt or "")

    def count(record: dict[str, Any]) -> None:
        summary.count(record)
        on_result(record)

    ledger = Ledger(output_path)
    try:
        summary.repaired_bytes = ledger.repaired
        for bad in invalid:  # with skip_invalid: an errored result each, never silently dropped
            custom_id = bad.custom_id or f"line-{bad.line}"
            if custom_id not in ledger.done and not bad.reason.startswith("duplicate"):
                record = failed(bad, "invalid", f"line {bad.line}: {bad.reason}", fmt or "openai")
                ledger.write(record)
                count(record)
        todo = [item for item in items if item.custom_id not in ledger.done]
        summary.already_done = len(items) - len(todo)
        if todo:
            delta = with_pool(
                pool,
                lambda url: asyncio.run(
                    _run(url, todo, ledger, concurrency, count, on_start, retry_budget, rpm, tpm, on_status)
                ),
            )
            summary.stalls_recovered, summary.retries = delta["stalls"], delta["retries"]
            summary.throttled, summary.batch_retries = delta["throttled"], delta["batch_retries"]
            summary.lowest_concurrency = delta["lowest_concurrency"]
    finally:
        ledger.close()
    return summary.finish(started)


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
