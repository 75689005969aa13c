"""Where a call's time goes, per process: py-spy samples the caller, the gateway, the broker and
the worker while one kind of call runs in a loop, and each function's CPU is given in µs per call.
Not a scenario (it prints, it stores nothing); a tool for the profile behind issue 21:

    python -m bench.hops shim|gateway|direct tiny|count|chat|long [--seconds 10] [--rate 500] [--out DIR]

`tiny`: the 8-token Anthropic stream; `count`: `messages.count_tokens` (nothing streamed); `chat`: the
one-token OpenAI chat stream; `long`: 5,000-token Anthropic streams (µs per event then).
py-spy (in the venv: `pip install py-spy`) runs with --nonblocking; samples of idle threads are
left out, so a function's figure is CPU, not waiting.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import anthropic
import openai

from broker import Pool
from broker import shim as isoshim
from broker.fake_provider import FakeProviderProcess, Latency
from broker.http.gateway import PROFILE_HEADER

from .common import base_url
from .sidebyside import ASK, TINY_STREAM, Processes, read_all
from .upstreams import child_of, worker_pids

LONG = 5000


def _client(path: str, kind: str, fake: FakeProviderProcess, pool: Pool) -> Any:
    """The SDK client of `kind` (anthropic, openai) that `path` gives an application."""
    if path == "shim":
        return (isoshim.Anthropic if kind == "anthropic" else isoshim.OpenAI)(pool=pool)
    sdk = anthropic.Anthropic if kind == "anthropic" else openai.OpenAI
    if path == "gateway":
        return sdk(base_url=base_url(pool.http_url, kind), api_key="unused", max_retries=0,
                   default_headers={PROFILE_HEADER: kind})  # fmt: skip
    return sdk(base_url=base_url(fake.url, kind), api_key="unused", max_retries=0)


def _spy(pid: int, out: str, rate: int, seconds: float) -> subprocess.Popen:
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or "py-spy"
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--duration", str(int(seconds)),
                             "--format", "raw", "--nonblocking", "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _functions(raw: str) -> tuple[collections.Counter, collections.Counter, int, int]:
    """(self samples, inclusive samples, total samples) per `function (file)` of a py-spy raw file, and the
    number of lines skipped as corrupted (no stack, or a count that is no integer: a py-spy cut off mid-write)."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = skipped = 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count) if count.isascii() and count.isdigit() else 0
            if not stack.strip() or not n:
                skipped += 1
                continue
            frames = [frame.rsplit(":", 1)[0] for frame in stack.split(";")]
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    return own, inclusive, total, skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("path", choices=("shim", "gateway", "direct"))
    parser.add_argument("call", choices=("tiny", "count", "chat", "long"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", help="keep the raw py-spy files here")
    parser.add_argument("--timeline", action="store_true", help="shim only: time each stretch of a call, no py-spy")
    args = parser.parse_args(argv)
    if args.timeline and args.path != "shim":
        parser.error("--timeline times the shim's stretches: use it with `shim`")
    tokens = {"tiny": TINY_STREAM, "chat": 1}.get(args.call, LONG)
    kind = "openai" if args.call == "chat" else "anthropic"
    profiles = {kind: {"kind": kind, "min_workers": 1, "max_workers": 1}}
    out = args.out or tempfile.mkdtemp(prefix="hops-")  # read once the pool has stopped, then removed
    os.makedirs(out, exist_ok=True)
    try:
        _profile(args, tokens, profiles, out)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


def _profile(args: argparse.Namespace, tokens: int, profiles: dict[str, Any], out: str) -> None:
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(FakeProviderProcess(Latency(tokens=1_000_000)))
        kind = next(iter(profiles))
        profiles[kind]["base_url"] = base_url(fake.url, kind)
        pool = stack.enter_context(Pool(profiles=profiles, http="127.0.0.1:0"))
        info = stack.enter_context(pool.client())
        sdk = _client(args.path, kind, fake, pool)
        stack.callback(sdk.close)

        def call() -> int:
            if args.call == "count":
                sdk.messages.count_tokens(model="claude-bench", messages=ASK)
                return 0
            if args.call == "chat":
                return read_all(sdk.chat.completions.create(model="gpt-bench", max_completion_tokens=tokens,
                                                            messages=ASK, stream=True))  # fmt: skip
            return read_all(sdk.messages.create(model="claude-bench", max_tokens=tokens, messages=ASK, stream=True))

        for _ in range(20):
            call()
        if args.timeline:
            for name, us in timeline(sdk, call, int(args.seconds * 100)).items():
                print(f"{us:9.1f} µs  {name}")
            return
        pids = {"caller": os.getpid(), "gateway": child_of(pool.pid, "broker.http.gateway"), "broker": pool.pid,
                "worker": worker_pids(info)[0], "upstream": fake.pid}  # fmt: skip
        processes = Processes({role: [pid] for role, pid in pids.items()})
        spies = {role: _spy(pid, os.path.join(out, f"{role}.txt"), args.rate, args.seconds)
                 for role, pid in pids.items()}  # fmt: skip
        time.sleep(1.0)  # py-spy attaches
        before, calls, events, start = processes.cpu(processes.fixed), 0, 0, time.monotonic()
        while time.monotonic() - start < args.seconds - 1.5:
            events += call()
            calls += 1
        cpu, wall = processes.cpu(processes.fixed), time.monotonic() - start
        for spy in spies.values():
            spy.wait()
    per = events if args.call == "long" else calls
    unit = "event" if args.call == "long" else "call"
    print(f"{args.path} {args.call}: {calls} calls, {events} events in {wall:.1f} s: {wall / calls * 1e3:.3f} ms per "
          f"call (py-spy running)")  # fmt: skip
    for role in pids:
        used = (cpu[role] - before[role]) * 1e6 / per
        raw = os.path.join(out, f"{role}.txt")
        print(f"\n== {role} (pid {pids[role]}): {used:.1f} µs CPU per {unit} (psutil, profiler running)")
        if not os.path.exists(raw) or role == "upstream":
            continue
        own, inclusive, total, skipped = _functions(raw)
        scale = 1e6 / args.rate / per
        corrupted = f" ({skipped} corrupted lines skipped)" if skipped else ""
        print(f"   samples {total} = {total * scale:.1f} µs per {unit}{corrupted}; top by self time, then inclusive:")
        for name, n in own.most_common(args.top):
            print(f"   self {n * scale:8.1f}  {name}")
        for name, n in inclusive.most_common(args.top + 8):
            print(f"   incl {n * scale:8.1f}  {name}")


def timeline(sdk: Any, call: Any, calls: int) -> dict[str, float]:
    """Median µs of each stretch of a shim call, seen from the caller's process: the SDK building the
    request, the transport sending it, the pool's answer (broker, worker, upstream and back) to the
    loop thread, the hand-off to the calling thread, and the rest (the SDK reading the events)."""
    from broker.client import client as low

    marks: dict[str, float] = {}
    submit, take = low.Client.submit_http, low._CallState.take
    sockets = [c._async._sock for c in isoshim._clients.values()]  # the shim's pool connections
    routes = [sock._on_message for sock in sockets]

    def timed_submit(self: Any, *args: Any, **kwargs: Any) -> Any:
        marks.setdefault("transport", time.perf_counter())
        result = submit(self, *args, **kwargs)
        marks["sent"] = time.perf_counter()
        return result

    def timed(route: Any) -> Any:
        def timed_route(frames: list[bytes]) -> None:
            marks.setdefault("first_message_in", time.perf_counter())
            marks["messages"] = marks.get("messages", 0) + 1
            route(frames)

        return timed_route

    def timed_take(self: Any, item: Any) -> Any:
        marks.setdefault("first_taken", time.perf_counter())
        return take(self, item)

    low.Client.submit_http, low._CallState.take = timed_submit, timed_take
    for sock, route in zip(sockets, routes, strict=True):
        sock._on_message = timed(route)
    spans: dict[str, list[float]] = collections.defaultdict(list)
    try:
        for _ in range(calls):
            marks.clear()
            start = time.perf_counter()
            call()
            end = time.perf_counter()
            points = [("SDK builds the request", start), ("transport sends", marks["transport"]),
                      ("pool answers (to the loop thread)", marks["sent"]),
                      ("hand-off to the caller thread", marks["first_message_in"]),
                      ("SDK reads the events, the rest arriving", marks["first_taken"]), ("end", end)]  # fmt: skip
            for (name, at), (_, until) in itertools.pairwise(points):
                spans[name].append(until - at)
            spans["total"].append(end - start)
            spans["messages from the broker (count, not µs)"].append(marks["messages"] / 1e6)
    finally:
        low.Client.submit_http, low._CallState.take = submit, take
        for sock, route in zip(sockets, routes, strict=True):
            sock._on_message = route
    return {name: round(statistics.median(v) * 1e6, 1) for name, v in spans.items()}


if __name__ == "__main__":
    main()
