"""scale: many concurrent streams, each kept busy for a fixed time: aggregate events/s,
p99 gap between a stream's events, broker CPU per 1,000 relayed events and the memory
(USS) of broker + zygote + workers; next to the async SDK reading the same streams directly.

Targets: >= 60,000 events/s at 256 streams, broker CPU <= 15 µs per relayed event,
memory growing by <= 10 MB per extra worker."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic

from broker import Pool
from broker.fake_provider import LATENCY_HEADER, FakeProviderProcess

from .common import cpu_seconds, ms, percentile, pick, pool_pids, result, target, uss

ASK = [{"role": "user", "content": "hi"}]
STREAMS_PER_WORKER = 32


def _length(tokens: int) -> dict[str, str]:
    """The fake provider's output length for one request."""
    return {LATENCY_HEADER: f"tokens={tokens}"}


async def _drive(concurrency: int, seconds: float, stream: Callable[[int], AsyncIterator[Any]]) -> dict[str, Any]:
    """Keep `concurrency` streams going for `seconds`; events counted and gaps sampled in the window."""
    events = 0
    gaps: list[float] = []
    stop = time.perf_counter() + seconds

    async def lane(lane_id: int) -> None:
        nonlocal events
        n = 0
        while time.perf_counter() < stop:
            last = None
            async for _ in stream(lane_id * 1_000_000 + n):
                now = time.perf_counter()
                if now > stop:
                    break
                events += 1
                if last is not None and events % 7 == 0:  # a sample is plenty, and cheap
                    gaps.append(now - last)
                last = now
            n += 1

    start = time.perf_counter()
    await asyncio.gather(*(lane(i) for i in range(concurrency)))
    elapsed = min(time.perf_counter(), stop) - start
    return {"events": events, "events_per_s": round(events / elapsed), "p99_gap_ms": ms(percentile(gaps or [0], 0.99))}


async def _pooled(pool: Pool, concurrency: int, seconds: float, tokens: int) -> dict[str, Any]:
    async with pool.async_client() as client:

        async def stream(i: int) -> AsyncIterator[Any]:
            args = {"model": "claude-bench", "max_tokens": tokens, "stream": True,
                    "messages": [{"role": "user", "content": f"scale {i}"}]}  # fmt: skip
            call = await client.submit("anthropic", "messages.create", extra_headers=_length(tokens), **args)
            async for event in call:
                yield event

        return await _drive(concurrency, seconds, stream)


async def _direct(url: str, concurrency: int, seconds: float, tokens: int) -> dict[str, Any]:
    sdk = anthropic.AsyncAnthropic(base_url=url, max_retries=0)

    async def stream(i: int) -> AsyncIterator[Any]:
        messages = [{"role": "user", "content": f"scale {i}"}]
        async with await sdk.messages.create(
            model="claude-bench", max_tokens=tokens, messages=messages, stream=True, extra_headers=_length(tokens)
        ) as events:
            async for event in events:
                yield event

    try:
        return await _drive(concurrency, seconds, stream)
    finally:
        await sdk.close()


def level(url: str, concurrency: int, seconds: float, tokens: int) -> dict[str, Any]:
    workers = math.ceil(concurrency / STREAMS_PER_WORKER)
    profile = {"kind": "anthropic", "base_url": url, "min_workers": workers, "max_workers": workers,
               "spare_workers": 0, "concurrency": STREAMS_PER_WORKER}  # fmt: skip
    with Pool(profiles={"anthropic": profile}) as pool, pool.client() as client:
        pids = pool_pids(client.stats(), pool.pid)
        idle = uss(pids)
        cpu0 = cpu_seconds(pool.pid)
        pooled = asyncio.run(_pooled(pool, concurrency, seconds, tokens))
        broker_cpu = cpu_seconds(pool.pid) - cpu0
        busy = uss(pool_pids(client.stats(), pool.pid))
    direct = asyncio.run(_direct(url, concurrency, seconds, tokens))
    return {
        "concurrency": concurrency, "workers": workers,
        "pool_events_per_s": pooled["events_per_s"], "direct_events_per_s": direct["events_per_s"],
        "ratio_to_direct": round(pooled["events_per_s"] / max(direct["events_per_s"], 1), 3),
        "pool_p99_gap_ms": pooled["p99_gap_ms"], "direct_p99_gap_ms": direct["p99_gap_ms"],
        "p99_gap_added_ms": round(pooled["p99_gap_ms"] - direct["p99_gap_ms"], 3),
        "broker_cpu_us_per_event": round(broker_cpu / max(pooled["events"], 1) * 1e6, 2),
        "broker_cpu_s_per_1000_events": round(broker_cpu / max(pooled["events"], 1) * 1000, 5),
        "uss_idle_mb": round(idle / 2**20, 1), "uss_busy_mb": round(busy / 2**20, 1),
    }  # fmt: skip


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    levels = pick(size, [1, 8, 64, 256, 512], [1, 8, 64], [1, 4])
    seconds, tokens = pick(size, (4.0, 500), (1.5, 500), (0.5, 50))
    with FakeProviderProcess() as fake:
        rows = [level(fake.url, c, seconds, tokens) for c in levels]
    targets = []
    at_256 = next((r for r in rows if r["concurrency"] == 256), None)
    if at_256 is not None:
        targets.append(target("events/s at 256 streams", at_256["pool_events_per_s"], ">= 60000",
                              lambda v: v >= 60_000))  # fmt: skip
    busiest = max(rows, key=lambda r: r["concurrency"])
    targets.append(target(f"broker CPU per relayed event at {busiest['concurrency']} streams",
                          busiest["broker_cpu_us_per_event"], "<= 15 µs", lambda v: v <= 15))  # fmt: skip
    first, last = rows[0], rows[-1]
    if last["workers"] > first["workers"]:
        per_worker = (last["uss_idle_mb"] - first["uss_idle_mb"]) / (last["workers"] - first["workers"])
        targets.append(target("idle memory per extra worker (MB)", round(per_worker, 2), "<= 10 MB",
                              lambda v: v <= 10))  # fmt: skip
    inputs = {"concurrency": levels, "seconds_per_level": seconds, "events_per_stream": tokens,
              "streams_per_worker": STREAMS_PER_WORKER}  # fmt: skip
    return result(inputs, {"rows": rows}, targets, started)


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["streams", "workers", "pool events/s", "direct events/s", "× direct", "p99 gap ms (pool/direct)",
            "broker µs/event", "USS MB idle/busy"]  # fmt: skip
    rows = [
        [r["concurrency"], r["workers"], r["pool_events_per_s"], r["direct_events_per_s"], r["ratio_to_direct"],
         f"{r['pool_p99_gap_ms']} / {r['direct_p99_gap_ms']}", r["broker_cpu_us_per_event"],
         f"{r['uss_idle_mb']} / {r['uss_busy_mb']}"]
        for r in data["figures"]["rows"]
    ]  # fmt: skip
    return head, rows
