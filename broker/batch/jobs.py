"""Agent functions as batch jobs: `isopool batch IN.jsonl -o OUT.jsonl --job pkg.module:function`.

The function is called once per input line with the line's JSON and a `JobContext`
whose SDK clients (`ctx.anthropic`, `ctx.openai`: the drop-in shim) and low-level
`ctx.pool` client all go through the pool, so a stall inside a 20-turn agent run is
caught and retried at that one call, not by restarting the run. A plain function runs
in a thread, a coroutine function on an event loop (`ctx` then holds async clients).
Its return value (JSON-serialisable) or its exception becomes the line's result, with
the same exactly-once, resumable ledger as request files: a done id whose line changed is
refused (or run again), and a result that cannot be written (a full disk) starts no more
jobs and cancels those on the event loop (a job in a thread finishes; threads cannot be stopped).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import itertools
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from ..client.client import AsyncClient, Client
from ..client.pool import Pool
from .formats import Invalid, digest, duplicate, numbered_lines
from .ledger import Ledger
from .runner import BatchInputError, Summary, check_options, with_pool

_DEC = msgspec.json.Decoder()
_ENC = msgspec.json.Encoder()


@dataclass
class JobContext:
    """What a job function gets besides its line: pool-backed clients and the line's id."""

    custom_id: str
    anthropic: Any
    openai: Any
    pool: Client | AsyncClient


def load_job(spec: str) -> Callable[..., Any]:
    """`package.module:function`, importable from the current directory too."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"--job must look like package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load job {spec!r}: {exc}") from None
    if not callable(function):
        raise ValueError(f"job {spec!r} is not callable")
    return function


def _lines(path: str) -> tuple[list[tuple[str, Any]], list[Invalid]]:
    """(custom_id, JSON) per line (custom_id from the line, else `line-N`), and the invalid lines."""
    lines: list[tuple[str, Any]] = []
    problems: list[Invalid] = []
    seen: dict[str, int] = {}
    for number, raw in numbered_lines(path):
        try:
            data = _DEC.decode(raw)
        except msgspec.DecodeError as exc:
            problems.append(Invalid(number, None, f"malformed JSON: {exc}"))
            continue
        custom_id = data.get("custom_id") if isinstance(data, dict) else None
        custom_id = custom_id if isinstance(custom_id, str) and custom_id else f"line-{number}"
        if custom_id in seen:
            problems.append(duplicate(number, custom_id, seen[custom_id]))
            continue
        seen[custom_id] = number
        lines.append((custom_id, data))
    return lines, problems


def _fingerprints(lines: list[tuple[str, Any]]) -> dict[str, str]:
    """custom_id -> a short hash of its line (keys sorted: a reformatted file is the same input), in input
    order: what each result answers, for the ledger to compare with an earlier run's."""
    return {custom_id: digest(data) for custom_id, data in lines}


def _record(custom_id: str, outcome: Any, error: BaseException | None) -> dict[str, Any]:
    if error is None:
        try:
            _ENC.encode(outcome)
        except (TypeError, msgspec.EncodeError) as exc:
            error = TypeError(f"the job returned a value that is not JSON-serialisable: {exc}")
        else:
            return {"custom_id": custom_id, "result": {"type": "succeeded", "output": outcome}}
    frames = traceback.extract_tb(error.__traceback__)[-5:]
    where = [f"{f.filename}:{f.lineno} in {f.name}" for f in frames]
    failure = {"type": type(error).__name__, "message": str(error), "traceback": where}
    return {"custom_id": custom_id, "result": {"type": "errored", "error": failure}}


def run_job(
    input_path: str,
    output_path: str,
    job: str | Callable[..., Any],
    *,
    pool: Pool | str | None = None,
    concurrency: int = 16,
    rerun_changed: bool = False,
    on_result: Callable[[dict[str, Any]], None] = lambda record: None,
    on_start: Callable[[int], None] = lambda todo: None,
    on_interrupt: Callable[[int], None] = lambda running: None,
) -> Summary:
    """Call `job(line, ctx)` once per line not yet in the output; returns the summary. Raises as `run`
    does: BatchInputError, a BatchOutputError before anything runs (with `rerun_changed`, the done ids
    whose line changed run again instead of InputChanged), OutputWriteFailed when a result cannot be written.
    On Ctrl-C a coroutine job is cancelled; a job running in a thread cannot be, so `on_interrupt(running)`
    is told, their results are written as they end (a rerun would pay for them again), and a second
    Ctrl-C leaves them."""
    started = time.monotonic()
    check_options(concurrency)
    function = load_job(job) if isinstance(job, str) else job
    lines, problems = _lines(input_path)
    if problems:
        raise BatchInputError(input_path, problems)
    summary = Summary(total=len(lines), format="job", tokens=None)
    ledger = Ledger(output_path, source=input_path)

    def write(record: dict[str, Any]) -> None:
        ledger.write(record)
        summary.count(record)
        on_result(record)

    try:
        summary.repaired_bytes = ledger.repaired
        summary.rerun_changed = len(ledger.match_input(_fingerprints(lines), input_path, rerun_changed))
        todo = [(cid, data) for cid, data in lines if cid not in ledger.done]
        summary.already_done = len(lines) - len(todo)
        if todo:
            if inspect.iscoroutinefunction(function):
                with_pool(pool, lambda url: _run_async(url, function, todo, concurrency, write, on_start))
            else:
                with_pool(pool, lambda url: _run_threads(url, function, todo, concurrency, write, on_start,
                                                         on_interrupt))  # fmt: skip
    finally:
        ledger.close()
    return summary.finish(started)


def _run_threads(url: str, function: Callable, todo: list, concurrency: int, write: Callable, on_start: Callable,
                 on_interrupt: Callable[[int], None]) -> None:  # fmt: skip
    from ..shim import Anthropic, OpenAI

    with Client(url) as client:
        claude, gpt = Anthropic(pool=url), OpenAI(pool=url)
        on_start(len(todo))

        def call(custom_id: str, data: Any) -> dict[str, Any]:
            try:
                return _record(custom_id, function(data, JobContext(custom_id, claude, gpt, client)), None)
            except Exception as exc:
                return _record(custom_id, None, exc)

        # A job starts only when one has ended and been written, so that a failed write (or Ctrl-C)
        # leaves at most the jobs already running: queued all at once, the threads ran ahead of it.
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency))
        pending = iter(todo)
        running = {executor.submit(call, *item) for item in itertools.islice(pending, max(1, concurrency))}
        told = False
        with _ctrl_c_noted() as pressed:
            try:
                while running:
                    done, running = concurrent.futures.wait(running, _NOTICE, concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        write(future.result())  # from this one thread: the ledger is not shared between threads
                        if not pressed.is_set() and (item := next(pending, None)) is not None:
                            running.add(executor.submit(call, *item))
                    if pressed.is_set() and not told:
                        on_interrupt(len(running))
                        told = True
            finally:
                executor.shutdown(wait=False, cancel_futures=True)
        if pressed.is_set():
            raise KeyboardInterrupt


_NOTICE = 0.2  # seconds a first Ctrl-C may wait to be told of, while no job ends


@contextlib.contextmanager
def _ctrl_c_noted() -> Iterator[threading.Event]:
    """A first Ctrl-C only sets the event, so that no result is cut off between a job's end and its line (the
    caller stops starting jobs, writes those running as they end, then raises KeyboardInterrupt); a second
    raises at once. Only the main thread takes signals: elsewhere, Ctrl-C stays as it was."""
    pressed = threading.Event()

    def note(signum: int, frame: Any) -> None:
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()

    own = threading.current_thread() is threading.main_thread()
    own = own and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, note) if own else None
    try:
        yield pressed
    finally:
        if own:
            signal.signal(signal.SIGINT, previous)


def _run_async(url: str, function: Callable, todo: list, concurrency: int, write: Callable, on_start: Callable):
    from ..shim import AsyncAnthropic, AsyncOpenAI

    async def main() -> None:
        async with AsyncClient(url) as client, AsyncAnthropic(pool=url) as claude, AsyncOpenAI(pool=url) as gpt:
            on_start(len(todo))
            pending = iter(todo)

            async def call(custom_id: str, data: Any) -> dict[str, Any]:
                try:
                    return _record(custom_id, await function(data, JobContext(custom_id, claude, gpt, client)), None)
                except Exception as exc:
                    return _record(custom_id, None, exc)

            async def lane() -> None:
                for custom_id, data in pending:
                    write(await call(custom_id, data))

            try:  # a failed write ends its lane, and the group cancels the others' jobs
                async with asyncio.TaskGroup() as lanes:
                    for _ in range(max(1, concurrency)):
                        lanes.create_task(lane())
            except BaseExceptionGroup as failures:
                raise failures.exceptions[0] from None

    asyncio.run(main())
