"""overhead: a tiny non-streaming request through the pool against the same SDK call made
directly to the fake provider, timed in turn (ABAB), sync and asyncio, Anthropic and OpenAI.

A request through the pool makes four ZeroMQ hops (caller -> broker -> worker and back);
the same run measures their floor: a bare ZeroMQ round trip between two processes that do
nothing else (two of those are the four hops), and a ping through the broker.

Target: <= 0.3 ms added at the median; p99 <= 1.5x the direct p99 + 1 ms."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import anthropic
import openai
import zmq

from broker import Pool
from broker.fake_provider import FakeProviderProcess

from .common import alternate, latency, pick, result, target

ASK = [{"role": "user", "content": "hi"}]
# (provider, SDK method path, arguments): the tiniest call of each API, and a one-token answer
CALLS = [
    ("anthropic", "messages.count_tokens", {"model": "claude-bench", "messages": ASK}),
    ("anthropic", "messages.create", {"model": "claude-bench", "max_tokens": 1, "messages": ASK}),
    ("openai", "models.list", {}),
    ("openai", "chat.completions.create", {"model": "gpt-bench", "messages": ASK, "max_completion_tokens": 1}),
]


_ECHO = """
import sys, zmq
sock = zmq.Context().socket(zmq.REP)
sock.bind(sys.argv[1])
print("ready", flush=True)
while (frames := sock.recv_multipart()) != [b"stop"]:
    sock.send_multipart(frames)
sock.send(b"")
"""


def zmq_round_trip(repeat: int) -> float:
    """Median seconds of a bare ZeroMQ ipc round trip to another process (REQ/REP echo)."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"ipc://{os.path.join(tmp, 'echo')}"
        echo = subprocess.Popen([sys.executable, "-c", _ECHO, url], stdout=subprocess.PIPE)
        try:
            echo.stdout.readline()  # type: ignore[union-attr]
            sock = zmq.Context.instance().socket(zmq.REQ)
            sock.connect(url)
            times = []
            for i in range(repeat + 100):
                start = time.perf_counter()
                sock.send_multipart([b"\x01", b"header", b"payload"])
                sock.recv_multipart()
                if i >= 100:
                    times.append(time.perf_counter() - start)
            sock.send(b"stop")
            sock.recv()
            sock.close(0)
            return statistics.median(times)
        finally:
            echo.wait(5)


def _method(sdk: Any, path: str) -> Any:
    for part in path.split("."):
        sdk = getattr(sdk, part)
    return sdk


def _row(name: str, pooled: list[float], direct: list[float]) -> dict[str, Any]:
    p, d = latency(pooled), latency(direct)
    return {
        "call": name,
        "pool": p,
        "direct": d,
        "added_median_us": round((p["median_ms"] - d["median_ms"]) * 1000),
        "added_p99_us": round((p["p99_ms"] - d["p99_ms"]) * 1000),
    }


async def _alternate_async(first: Any, second: Any, repeat: int, warmup: int = 20):
    a, b = [], []
    for _ in range(warmup):
        await first()
        await second()
    for _ in range(repeat):
        t0 = time.perf_counter()
        await first()
        t1 = time.perf_counter()
        await second()
        a.append(t1 - t0)
        b.append(time.perf_counter() - t1)
    return a, b


async def _async_rows(pool: Pool, fake_url: str, repeat: int) -> list[dict[str, Any]]:
    direct = {
        "anthropic": anthropic.AsyncAnthropic(base_url=fake_url, max_retries=0),
        "openai": openai.AsyncOpenAI(base_url=fake_url + "/v1", max_retries=0),
    }
    rows = []
    async with pool.async_client() as client:
        for provider, path, kwargs in CALLS:
            sdk_call = _method(direct[provider], path)

            async def pooled(provider=provider, path=path, kwargs=kwargs):
                return await client.request(provider, path, **kwargs)

            async def plain(sdk_call=sdk_call, kwargs=kwargs):
                return await sdk_call(**kwargs)

            rows.append(_row(f"{provider} {path} (asyncio)", *await _alternate_async(pooled, plain, repeat)))
    for sdk in direct.values():
        await sdk.close()
    return rows


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    repeat = pick(size, 1000, 200, 8)
    rows = []
    with FakeProviderProcess() as fake:
        profiles = {
            "anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 1},
            "openai": {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1},
        }
        with Pool(profiles=profiles) as pool, pool.client() as client:
            direct = {
                "anthropic": anthropic.Anthropic(base_url=fake.url, max_retries=0),
                "openai": openai.OpenAI(base_url=fake.url + "/v1", max_retries=0),
            }
            for provider, path, kwargs in CALLS:
                sdk_call = _method(direct[provider], path)
                pooled, plain = alternate(
                    lambda p=provider, m=path, k=kwargs: client.request(p, m, **k),
                    lambda c=sdk_call, k=kwargs: c(**k),
                    repeat,
                )
                rows.append(_row(f"{provider} {path}", pooled, plain))
            for sdk in direct.values():
                sdk.close()
            rows.extend(asyncio.run(_async_rows(pool, fake.url, repeat)))
            pings = alternate(client.ping, lambda: None, repeat)[0]
        bare = zmq_round_trip(repeat)
    floor = {
        "zmq_round_trip_us": round(bare * 1e6),
        "four_hops_us": round(2 * bare * 1e6),
        "broker_ping_us": round(statistics.median(pings) * 1e6),
    }
    targets = []
    for row in rows:
        targets.append(target(f"{row['call']}: added median", row["added_median_us"], "<= 300 us", lambda v: v <= 300))
        limit = 1.5 * row["direct"]["p99_ms"] + 1.0
        targets.append(
            target(f"{row['call']}: p99", row["pool"]["p99_ms"], f"<= {limit:.2f} ms", lambda v, m=limit: v <= m)
        )
    figures = {"rows": rows, "floor": floor}
    return result({"repeat": repeat, "calls": [f"{p} {m}" for p, m, _ in CALLS]}, figures, targets, started)


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["call", "direct median ms", "pool median ms", "added µs", "direct p99 ms", "pool p99 ms"]
    rows = [
        [r["call"], r["direct"]["median_ms"], r["pool"]["median_ms"], r["added_median_us"], r["direct"]["p99_ms"],
         r["pool"]["p99_ms"]]
        for r in data["figures"]["rows"]
    ]  # fmt: skip
    floor = data["figures"]["floor"]
    rows.append([f"floor: bare ZeroMQ round trip x2 = {floor['four_hops_us']} µs; ping via the broker "
                 f"{floor['broker_ping_us']} µs", None, None, floor["four_hops_us"], None, None])  # fmt: skip
    return head, rows
