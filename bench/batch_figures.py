"""Makespan of a batch with stalling streams: `isopool batch` against plain SDK clients.

1,000 Chat Completions requests, 5% of whose streams stall after a few events while the
server keeps sending `: ping` comments every second (which reset the SDK's read
timeout). The same requests are sent (a) through `isopool batch` and (b) by plain
`openai.OpenAI` clients with the SDK's default timeouts from as many threads as the
batch's concurrency. The baseline is capped; the requests still hanging at the cap are
counted.

    python -m bench.batch_figures [--requests 1000] [--concurrency 32] [--cap 120] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

os.environ.setdefault("OPENAI_API_KEY", "bench-key")

import openai  # noqa: E402

from broker import Pool  # noqa: E402
from broker.batch import run  # noqa: E402
from broker.fake_provider import FakeProviderProcess  # noqa: E402
from broker.fake_provider.server import Latency  # noqa: E402

from .common import emit, machine  # noqa: E402

STALL = {"stall-ping:after=3,interval=1,hold=3600": 0.05}
LATENCY = Latency(ttft=0.05, gap=0.01, tokens=24)


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}"}]


def through_isopool(n: int, concurrency: int, stale_timeout: float) -> dict:
    with FakeProviderProcess(LATENCY, STALL, seed=1) as fake, tempfile.TemporaryDirectory() as tmp:
        source, out = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
        with open(source, "w") as f:
            for i in range(n):
                body = {"model": "gpt-bench", "messages": messages(i)}
                f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                    "body": body}) + "\n")  # fmt: skip
        profiles = {"openai": {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 8,
                               "max_workers": concurrency}}  # fmt: skip
        with Pool(profiles=profiles, stale_timeout=stale_timeout) as pool:
            start = time.monotonic()
            summary = run(source, out, pool=pool, concurrency=concurrency)
            makespan = time.monotonic() - start
        stalls = fake.stats()["faults"]
    return {"makespan_s": round(makespan, 2), "ok": summary.ok, "failed": summary.failed,
            "stalls_injected": sum(stalls.values()), "stalls_recovered": summary.stalls_recovered,
            "stale_timeout_s": stale_timeout}  # fmt: skip


def plain_sdk(n: int, concurrency: int, cap: float) -> dict:
    """Threads with plain SDK clients (default timeouts); stops looking at `cap` seconds."""
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "failed": 0, "in_flight": 0}
    finished_at: list[float] = []

    def worker(url: str) -> None:
        client = openai.OpenAI(base_url=url)
        while True:
            with lock:
                i = state["next"]
                if i >= n:
                    return
                state["next"] += 1
                state["in_flight"] += 1
            try:
                for _ in client.chat.completions.create(model="gpt-bench", messages=messages(i), stream=True):
                    pass
                outcome = "ok"
            except Exception:
                outcome = "failed"
            with lock:
                state[outcome] += 1
                state["in_flight"] -= 1
                if state["ok"] + state["failed"] == n:
                    finished_at.append(time.monotonic())

    with FakeProviderProcess(LATENCY, STALL, seed=1) as fake:
        start = time.monotonic()
        for _ in range(concurrency):
            threading.Thread(target=worker, args=(fake.url + "/v1",), daemon=True).start()
        while time.monotonic() - start < cap and not finished_at:
            time.sleep(0.1)
        with lock:
            snapshot = dict(state)
        stalls = fake.stats()["faults"]
    # leaving the block stopped the fake provider, which ends the hanging streams of the threads
    makespan = (finished_at[0] - start) if finished_at else None
    return {"makespan_s": round(makespan, 2) if makespan else None, "capped_at_s": None if finished_at else cap,
            "ok": snapshot["ok"], "failed": snapshot["failed"], "hanging_at_cap": snapshot["in_flight"],
            "never_started": n - snapshot["next"], "stalls_injected": sum(stalls.values())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cap", type=float, default=120.0, help="seconds after which the baseline is stopped")
    parser.add_argument("--stale-timeout", type=float, default=5.0, help="the pool's stale_timeout")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results = {
        "machine": machine(),
        "inputs": {"requests": args.requests, "concurrency": args.concurrency, "stall_rate": 0.05},
        "isopool_batch": through_isopool(args.requests, args.concurrency, args.stale_timeout),
        "plain_sdk": plain_sdk(args.requests, args.concurrency, args.cap),
    }
    emit(results, args.json)


if __name__ == "__main__":
    main()
