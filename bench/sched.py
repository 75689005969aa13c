"""Where a shim call's time goes, stretch by stretch, read off the kernel scheduler's record (`perf sched`).
Each thread that handles a call wakes the next one (the caller's thread its ZeroMQ I/O thread, that thread the
broker's, ...), so the times of those wake-ups cut the call into stretches, each one thread's work plus the
wake-up of the next. The same call through the bare broker (bench/floor.py: a loop passing messages on, and a
relay making the request with aiohttp) is cut alike, stretch for stretch, in the same run: the difference per
stretch is what the pool's own code adds there. No process is changed or instrumented for it.

    python -m bench.sched [--calls 1000]

The call is `messages.count_tokens` on the fake provider: one message each way at every hop (a stream's
events go in several). The two paths take turns in blocks of 50 calls under one record. Needs `perf` and the
right to record the scheduler (root, or kernel.perf_event_paranoid <= -1); perf's own work slows every path
alike, so compare the columns, not the totals with other runs.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

from broker import Pool
from broker import shim as isoshim

from . import floor
from .common import in_blocks
from .sidebyside import ASK
from .upstreams import profiles, upstreams, worker_pids

# Who wakes whom, in order, for one call: "caller" is the calling thread, "loop" the shim client's own thread.
_THERE = ["caller>callerIO", "callerIO>brokerIO", "brokerIO>broker", "broker>brokerIO", "brokerIO>workerIO",
          "workerIO>worker", "worker>upstream", "upstream>worker", "worker>workerIO", "workerIO>brokerIO",
          "brokerIO>broker", "broker>brokerIO", "brokerIO>callerIO"]  # fmt: skip
SHIM_CHAIN = [*_THERE, "callerIO>loop", "loop>caller"]
BARE_CHAIN = [*_THERE, "callerIO>caller"]
# Stretches: (what happens, index of the wake-up it starts at, of the one it ends at; -1: the last).
STRETCHES = [
    ("the request reaches the broker's thread", 0, 2),
    ("broker: request read, admitted, sent to a worker", 2, 3),
    ("it reaches the worker's thread", 3, 5),
    ("worker: call read, HTTP request built and written", 5, 6),
    ("the upstream answers", 6, 7),
    ("worker: answer read, sent", 7, 8),
    ("it reaches the broker's thread", 8, 10),
    ("broker: answer passed on to the caller", 10, 11),
    ("it reaches the calling thread", 11, -1),
]
_ROW = re.compile(r"^\s*([\d.]+)\s+\[\d+\]\s+(\S+)\s+awakened: (\S+)")
_TID = re.compile(r"\[(\d+)(?:/\d+)?\]$")


def wakeups(timehist: Iterable[str], roles: dict[int, str]) -> list[tuple[float, str]]:
    """(seconds, "waker>woken") of each wake-up between two threads of `roles` (tid -> role), from the lines
    of `perf sched timehist -w`."""
    out = []
    for line in timehist:
        if (m := _ROW.match(line)) is None:
            continue
        waker, woken = (_TID.search(m[i]) for i in (2, 3))
        if waker and woken and (a := roles.get(int(waker[1]))) and (b := roles.get(int(woken[1]))):
            out.append((float(m[1]), f"{a}>{b}"))
    return out


def calls(events: list[tuple[float, str]], chain: list[str]) -> list[list[float]]:
    """The times of each call's wake-ups, for every call whose whole chain is found in order (a call whose
    chain another wake-up of the same threads interrupts, a probe or a heartbeat, is skipped)."""
    found, current = [], None
    for at, step in events:
        if step == chain[0]:
            current = [at]
        elif current is not None and step == chain[len(current)]:
            current.append(at)
            if len(current) == len(chain):
                found.append(current)
                current = None
    return found


def stretches(found: list[list[float]], of: Callable[[Iterable[float]], float] = statistics.median) -> dict[str, float]:
    """µs of each stretch over the calls found, and of the whole (`total`): their median, or `of` them."""
    out = {}
    for n, (name, start, end) in enumerate(STRETCHES):
        out[f"{n + 1}. {name}"] = of((c[end] - c[start]) * 1e6 for c in found)
    out["total: request sent -> answer in the calling thread"] = of((c[-1] - c[0]) * 1e6 for c in found)
    return out


def slowest(found: list[list[float]], share: float = 0.01) -> list[list[float]]:
    """The calls whose whole took longest, `share` of them (at least one): where a tail's time went."""
    return sorted(found, key=lambda c: c[-1] - c[0])[-max(1, round(len(found) * share)) :]


def _threads(pid: int, main: str, io: str) -> dict[int, str]:
    """`pid`'s main thread as `main`, its ZeroMQ I/O threads as `io`."""
    roles = {pid: main}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        with contextlib.suppress(OSError), open(f"{task}/comm") as f:
            if f.read().startswith("ZMQbg/IO"):
                roles[int(os.path.basename(task))] = io
    return roles


def _recorded(work: Callable[[], Any], out: str) -> list[str]:
    """`perf sched timehist -w` of the scheduler while `work` runs."""
    perf = subprocess.Popen(["perf", "sched", "record", "-q", "-o", out], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(1.0)  # perf attaches
        work()
    finally:
        perf.send_signal(signal.SIGINT)
        try:
            perf.wait(30)
        except subprocess.TimeoutExpired:
            perf.kill()
            perf.wait()
    hist = subprocess.run(["perf", "sched", "timehist", "-w", "-i", out], capture_output=True, text=True)
    return hist.stdout.splitlines()


def _count(sdk: Any) -> None:
    sdk.messages.count_tokens(model="claude-bench", messages=ASK)


def _check_perf() -> str | None:
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: apt install linux-perf)"
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run(["perf", "sched", "record", "-q", "-o", f"{tmp}/p", "--", "true"], capture_output=True)
    if probe.returncode:
        why = probe.stderr.decode(errors="replace").strip()[-300:]
        return f"perf cannot record the scheduler here (root, or kernel.perf_event_paranoid <= -1): {why}"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sched", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--calls", type=int, default=1000, help="per path (default 1000)")
    args = parser.parse_args(argv)
    if problem := _check_perf():
        parser.error(problem)
    rows: dict[str, dict[str, float]] = {}
    tails: dict[str, dict[str, float]] = {}
    matched: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sched-"))
        servers = stack.enter_context(upstreams())
        pool = stack.enter_context(Pool(profiles=profiles(servers)))
        info = stack.enter_context(pool.client())
        bare, bare_pids = stack.enter_context(floor.bare_paths(servers))
        shim = isoshim.Anthropic(pool=pool, pool_profile="anthropic")
        stack.callback(shim.close)
        through_bare = bare[1].upstreams["fake"].anthropic
        for sdk in (shim, through_bare):
            for _ in range(200):  # warm: connections, first-call costs (the shim connects on its first call)
                _count(sdk)
        loop = next(iter(isoshim._clients.values()))._thread.native_id  # the shim client's own thread
        others = {servers["fake"].pid: "upstream", **_threads(os.getpid(), "caller", "callerIO")}
        paths = {
            "shim": (shim, SHIM_CHAIN, {**_threads(pool.pid, "broker", "brokerIO"), loop: "loop",
                                        **_threads(worker_pids(info)[0], "worker", "workerIO")}),
            "bare broker": (through_bare, BARE_CHAIN, {**_threads(bare_pids["broker"][0], "broker", "brokerIO"),
                                                       **_threads(bare_pids["worker"][0], "worker", "workerIO")}),
        }  # fmt: skip
        # the paths in blocks of 50 taken in turn, so that the machine's drift during the record hits both alike
        runners = {name: lambda n, sdk=sdk: [_count(sdk) for _ in range(n)] for name, (sdk, _, _) in paths.items()}
        record = _recorded(lambda: in_blocks(runners, max(1, args.calls // 50), 50), os.path.join(tmp, "sched.data"))
        for name, (_, chain, roles) in paths.items():
            found = calls(wakeups(record, {**roles, **others}), chain)
            if not found:
                sys.exit(f"{name}: no call's chain of wake-ups was found in perf's record")
            rows[name], matched[name] = stretches(found), len(found)
            tails[name] = stretches(slowest(found), statistics.fmean)
    calls_ = ", ".join(f"{n}: {k} calls" for n, k in matched.items())
    _table(f"count_tokens, median µs per stretch ({calls_}, perf recording):", rows)
    _table("The slowest 1% of each path's calls (its tail), mean µs per stretch:", tails)


def _table(title: str, rows: dict[str, dict[str, float]]) -> None:
    print(title)
    print(f"{'':56} {'shim':>7} {'bare broker':>12} {'difference':>11}")
    for stretch in rows["shim"]:
        ours, floor_ = rows["shim"][stretch], rows["bare broker"][stretch]
        print(f"{stretch:56} {ours:7.0f} {floor_:12.0f} {ours - floor_:+11.0f}")


if __name__ == "__main__":
    main()
