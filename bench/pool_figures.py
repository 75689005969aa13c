"""The pool's headline figures, each a median over repeated runs next to a baseline measured
in the same run (this machine is shared and noisy):

- respawn: SIGKILL of an idle worker -> its replacement READY (zygote fork), against a
  fresh interpreter importing the SDKs and building a client;
- stale recovery: the moment `first_event_timeout` expires -> first event of the retry,
  next to a clean stream's submit -> first event (the provider's part of that time);
- detection precision: stall noticed by the caller minus `stale_timeout`;
- memory: unique memory (USS) of idle workers, the zygote and the broker;
- overhead: a tiny non-streaming request through the pool vs the same SDK call made
  directly against the fake provider.

    python -m bench.pool_figures [--repeat 30] [--json results.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import anthropic
import psutil

from broker import Pool, StreamStalled
from broker.fake_provider import FAULT_HEADER, FakeProviderProcess

from .common import alternate, emit, machine, median_ms, p99_ms

os.environ.setdefault("ANTHROPIC_API_KEY", "bench-key")
os.environ.setdefault("OPENAI_API_KEY", "bench-key")

MSG = {"model": "claude-bench", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}


def _uss(pid: int) -> int:
    return psutil.Process(pid).memory_full_info().uss


def respawn(client, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        workers = {w["ident"]: w for w in client.stats()["workers"]}
        victim = next(w for w in workers.values() if w["state"] == "ready" and w["profile"] == "anthropic")
        start = time.perf_counter()
        os.kill(victim["pid"], 9)
        while True:
            fresh = [w for w in client.stats()["workers"] if w["ident"] not in workers and w["state"] == "ready"]
            if fresh:
                times.append(time.perf_counter() - start)
                break
        time.sleep(0.05)
    return times


def fresh_interpreter(repeat: int) -> list[float]:
    code = "import anthropic, openai; anthropic.AsyncAnthropic(api_key='x'); openai.AsyncOpenAI(api_key='x')"
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-P", "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return times


def first_event(client, args: dict, fault: str = "", timeout: float = 0.0) -> float:
    """Seconds from submit to the first event of a stream (minus `timeout`), read to the end."""
    headers = {FAULT_HEADER: fault} if fault else {}
    limits = {"first_event_timeout": timeout} if timeout else {}
    start = time.perf_counter()
    call = client.submit("anthropic", "messages.create", stream=True, extra_headers=headers, **limits, **args)
    events = iter(call)
    next(events)
    elapsed = time.perf_counter() - start - timeout
    for _ in events:  # read to the end (dropping the iterator early would cancel the call)
        pass
    return elapsed


def stale_recovery(client, repeat: int, timeout: float) -> tuple[list[float], list[float]]:
    """Stream whose first attempt sends only pings: first event of the retry minus expiry; and,
    alternating with it, the first event of a clean stream: the provider's time to first event
    as seen through the pool, which the recovery time includes."""
    recovery, clean = [], []
    for i in range(repeat):
        args = {**MSG, "messages": [{"role": "user", "content": f"recovery {i}"}]}
        recovery.append(first_event(client, args, "stall-first:interval=0.05", timeout))
        clean.append(first_event(client, {**args, "max_tokens": 2}))
    return recovery, clean


def detection(client, repeat: int, timeout: float) -> list[float]:
    """Seen stream stalling with pings: StreamStalled arrival minus (last event + stale_timeout)."""
    lateness = []
    for i in range(repeat):
        args = {**MSG, "max_tokens": 10, "messages": [{"role": "user", "content": f"detect {i}"}]}
        call = client.submit(
            "anthropic", "messages.create", stream=True, stale_timeout=timeout,
            extra_headers={FAULT_HEADER: "stall-ping:after=5,interval=0.05"}, **args,
        )  # fmt: skip
        last = time.perf_counter()
        try:
            for _ in call:
                last = time.perf_counter()
        except StreamStalled:
            lateness.append(time.perf_counter() - last - timeout)
    return lateness


def overhead(client, direct: anthropic.Anthropic, repeat: int, method: str) -> tuple[list[float], list[float]]:
    """The pool against the same SDK call made directly, timed in turn."""
    kwargs = MSG if method == "messages.create" else {"model": MSG["model"], "messages": MSG["messages"]}
    direct_call = direct.messages.create if method == "messages.create" else direct.messages.count_tokens
    return alternate(lambda: client.request("anthropic", method, **kwargs), lambda: direct_call(**kwargs), repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30, help="runs per figure (overhead uses 20x this)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results: dict[str, object] = {"machine": machine()}
    with FakeProviderProcess() as fake:
        profiles = {"anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 4, "spare_workers": 2}}
        with Pool(profiles=profiles, heartbeat_interval=0.2) as pool, pool.client() as client:
            time.sleep(1.0)
            stats = client.stats()
            idle = [_uss(w["pid"]) for w in stats["workers"]]
            results["memory_mb"] = {
                "idle_worker_uss_median": round(statistics.median(idle) / 2**20, 2),
                "zygote_uss": round(_uss(stats["zygote_pid"]) / 2**20, 2),
                "broker_uss": round(_uss(pool.pid) / 2**20, 2),
            }
            r = respawn(client, args.repeat)
            f = fresh_interpreter(max(3, args.repeat // 10))
            results["respawn_ms"] = {"zygote_median": median_ms(r), "fresh_interpreter_median": median_ms(f)}
            rec, clean = stale_recovery(client, args.repeat, 0.2)
            results["stale_recovery_ms"] = {
                "median": median_ms(rec),
                "p99": p99_ms(rec),
                "clean_first_event_median": median_ms(clean),
                "added_median": round(median_ms(rec) - median_ms(clean), 3),
            }
            det = detection(client, args.repeat, 0.2)
            results["detection_lateness_ms"] = {"median": median_ms(det), "p99": p99_ms(det)}
            direct = anthropic.Anthropic(base_url=fake.url, max_retries=0)
            for method in ("messages.count_tokens", "messages.create"):
                pooled, plain = overhead(client, direct, args.repeat * 20, method)
                results[f"overhead_{method}_ms"] = {
                    "pool_median": median_ms(pooled),
                    "direct_median": median_ms(plain),
                    "added_median": round(median_ms(pooled) - median_ms(plain), 3),
                    "pool_p99": p99_ms(pooled),
                    "direct_p99": p99_ms(plain),
                }
            direct.close()
    emit(results, args.json)


if __name__ == "__main__":
    main()
