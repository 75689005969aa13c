"""What every scenario shares: sizes, the machine description, percentiles, ABAB timing
against a baseline, process memory and CPU, targets, and the table printed at the end."""

from __future__ import annotations

import glob
import os
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import psutil

from broker.loadtest.machine import machine, versions

os.environ.setdefault("ANTHROPIC_API_KEY", "bench-key")
os.environ.setdefault("OPENAI_API_KEY", "bench-key")

SIZES = ("full", "quick", "tiny")  # tiny: the test suite's smoke run


def pick(size: str, full: Any, quick: Any, tiny: Any) -> Any:
    return {"full": full, "quick": quick, "tiny": tiny}[size]


def base_url(url: str, kind: str) -> str:
    """The base URL an SDK of `kind` (anthropic, openai) takes for a server at `url`: OpenAI's paths start after /v1."""
    return url + ("/v1" if kind == "openai" else "")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def latency(values: list[float]) -> dict[str, float]:
    """Median, p99 and mean of durations in seconds, in milliseconds."""
    return {
        "median_ms": ms(statistics.median(values)),
        "p99_ms": ms(percentile(values, 0.99)),
        "mean_ms": ms(statistics.fmean(values)),
        "n": len(values),
    }


def alternate(first: Callable[[], Any], second: Callable[[], Any], repeat: int, warmup: int = 20):
    """Time `first` and `second` in turn (ABAB), so that drift in machine load hits both alike."""
    a, b = in_turn([first, second], repeat, warmup)
    return a, b


def in_turn(calls: list[Callable[[], Any]], repeat: int, warmup: int = 20) -> list[list[float]]:
    """Seconds of each of `calls`, made one after the other `repeat` times (ABCABC), after `warmup` rounds."""
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    clock = time.perf_counter
    for _ in range(repeat):
        for call, spent in zip(calls, times, strict=True):
            t0 = clock()
            call()
            spent.append(clock() - t0)
    return times


def in_blocks(runners: dict[str, Callable[[int], Any]], rounds: int, block: int) -> dict[str, list[Any]]:
    """What each runner returns per round, given `block` calls a round; the order turns every round, so that
    no runner always follows the same other (in_turn's drift argument, for runners in other processes)."""
    names = list(runners)
    out: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(runners[name](block))
    return out


def timed(call: Callable[[], Any], n: int) -> list[float]:
    """Seconds of each of `n` calls of `call`, one after the other."""
    spent = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        call()
        spent.append(clock() - t0)
    return spent


def uss(pids: Iterable[int]) -> int:
    """Unique memory of the processes in bytes (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().uss
        except psutil.Error:
            pass
    return total


def pool_pids(stats: dict[str, Any], broker_pid: int) -> list[int]:
    """Broker, zygote and every worker of a pool, from its stats snapshot."""
    return [broker_pid, stats["zygote_pid"], *(w["pid"] for w in stats["workers"] if w["pid"])]


def cpu_seconds(pid: int) -> float:
    """User + system seconds `pid` has run."""
    return sched_seconds(pid)[0]


_THREADS: dict[tuple[int, str], tuple[int, int]] = {}  # (pid, thread) -> its counts when last read


def sched_seconds(pid: int) -> tuple[float, float]:
    """(seconds `pid` has run, seconds it waited, ready, for a CPU): the scheduler's nanosecond counts of
    each thread where Linux keeps them (psutil's CPU moves in 10 ms ticks, coarse for a call of 2 ms);
    elsewhere psutil's CPU and no wait. A thread that ended keeps the counts it had when last read (Linux
    drops its file), so the figures never go back; one that began and ended between two readings is not
    counted (a lower bound for a process that makes short-lived threads, such as LiteLLM's proxy)."""
    threads = glob.glob(f"/proc/{pid}/task/*/schedstat")
    if not threads:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system, 0.0
    for path in threads:
        try:
            with open(path) as f:
                run, wait, _ = f.read().split()
            _THREADS[(pid, path)] = int(run), int(wait)
        except (OSError, ValueError):  # a thread that ended meanwhile: its last counts stand
            continue
    counts = [c for (p, _), c in _THREADS.items() if p == pid]
    return sum(c[0] for c in counts) / 1e9, sum(c[1] for c in counts) / 1e9


class Target(msgspec.Struct, frozen=True):
    """One target of the issue: the figure, what it must be, and whether this run met it; when it did not,
    `bound` names the floor measured in the same run that misses it too (what prevents it), else ''."""

    name: str
    value: float | None
    goal: str
    met: bool
    bound: str = ""

    def verdict(self) -> str:
        return "met" if self.met else f"NOT met, beyond the floor: {self.bound}" if self.bound else "NOT met"


def target(name: str, value: float | None, goal: str, ok: Callable[[float], bool],
           floor: tuple[str, float] | None = None) -> Target:  # fmt: skip
    """`floor`: (what, its figure) of the least a path of its kind can do in this run: it bounds the target
    when it misses the goal too; how far ours is above it is said with it (that part is ours)."""
    met = value is not None and ok(value)
    bound = ""
    if floor is not None and value is not None and not met and not ok(floor[1]):
        bound = f"{floor[0]} {floor[1]:.2f} misses it too; ours {value - floor[1]:+.2f} from it"
    return Target(name, value, goal, met, bound)


def verdict(data: dict[str, Any]) -> str:
    """A stored target's verdict (older results have no `bound`)."""
    return Target(**data).verdict()


def result(inputs: dict[str, Any], figures: dict[str, Any], targets: list[Target], started: float) -> dict[str, Any]:
    """One scenario's JSON object."""
    return {
        "inputs": inputs,
        "figures": figures,
        "targets": [msgspec.structs.asdict(t) for t in targets],
        "machine": machine(),
        "versions": versions(),
        "seconds": round(time.monotonic() - started, 1),
    }
