"""loadgen: `isopool loadtest` as a load generator, against a minimal single-process asyncio
client on the official SDK (the kind of client a load test is usually written as), both
driving the same fake provider with 500-token streamed chat completions, unpaced.

Per concurrency: output chunks/s sustained, streams actually in flight against those asked
for, and the generator's CPU per 1,000 chunks; at concurrency 1, the time to first token
each reports. Target: >= 80,000 chunks/s at 256 streams with >= 95% of them in flight,
unless the fake provider is the limit (then the generator's ceiling is what is shown)."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from typing import Any

import openai

from broker.fake_provider import FakeProviderProcess
from broker.fake_provider.server import Latency
from broker.loadtest import Options
from broker.loadtest import run as loadtest

from .common import cpu_seconds, ms, pick, result, target


async def _sdk_lanes(url: str, concurrency: int, seconds: float, warmup: float, tokens: int) -> dict[str, Any]:
    """The baseline: `concurrency` asyncio tasks on one AsyncOpenAI client, each streaming
    requests back to back; chunks and busy time counted inside the measured window."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0)
    start = time.monotonic()
    begin, end = start + warmup, start + warmup + seconds
    chunks, every_chunk, busy, ttfts = 0, 0, 0.0, []

    async def lane(k: int) -> None:
        nonlocal chunks, every_chunk, busy
        while time.monotonic() < end:
            sent, first = time.monotonic(), None
            stream = await client.chat.completions.create(
                model="gpt-bench", max_tokens=tokens, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"lane {k} at {sent}"}],
            )  # fmt: skip
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    now = time.monotonic()
                    first = first or now
                    every_chunk += 1
                    if begin <= now < end:
                        chunks += 1
            done = time.monotonic()
            busy += max(0.0, min(done, end) - max(sent, begin))
            if first is not None and sent >= begin:
                ttfts.append(first - sent)

    cpu_before = time.process_time()
    await asyncio.gather(*(lane(k) for k in range(concurrency)))
    cpu = time.process_time() - cpu_before
    await client.close()
    return {"chunks_per_s": chunks / seconds, "in_flight": busy / seconds,
            "ttft_p50": statistics.median(ttfts) if ttfts else None,  # none: every request outlived the window
            "cpu_per_1000_chunks": cpu / max(every_chunk, 1) * 1000}  # fmt: skip


def _isopool(url: str, concurrency: int, seconds: float, warmup: float, tokens: int, calibrate: bool) -> dict[str, Any]:
    options = Options(target=url + "/v1", concurrency=[concurrency], duration=warmup + seconds, warmup=warmup,
                      output_tokens=str(tokens), input_tokens="8", calibrate=calibrate)  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        point = loadtest(options, out)["points"][0]
    s, g = point["summary"], point["generator"]
    chunks_per_s = s["throughput"]["chunks_per_s"]
    cores = g["cpu_cores_mean"] or 0.0
    return {"chunks_per_s": chunks_per_s, "in_flight": g["in_flight_mean"], "ttft_p50": s["latency"]["ttft"]["p50"],
            "ttft_from_schedule_p50": s["latency"]["ttft_from_schedule"]["p50"],
            "cpu_per_1000_chunks": cores / max(chunks_per_s, 1) * 1000, "verdict": g["verdict"]}  # fmt: skip


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    levels, seconds, warmup, tokens = pick(size, ((1, 64, 256), 15.0, 3.0, 500), ((1, 64, 256), 5.0, 1.5, 500),
                                           ((8,), 1.0, 0.3, 50))  # fmt: skip
    rows = []
    with FakeProviderProcess(Latency(tokens=1_000_000)) as fake:  # max_tokens decides the length; unpaced
        fake_cpu = []
        for concurrency in levels:
            row: dict[str, Any] = {"concurrency": concurrency}
            for name, measure in (("isopool", _isopool), ("sdk", None)):
                before = cpu_seconds(fake.pid)
                if measure is None:
                    figures = asyncio.run(_sdk_lanes(fake.url, concurrency, seconds, warmup, tokens))
                else:
                    # the test suite's tiny run checks the path, not the generator's ceiling
                    figures = measure(fake.url, concurrency, seconds, warmup, tokens, calibrate=size != "tiny")
                fake_cpu.append((cpu_seconds(fake.pid) - before) / (seconds + warmup))
                row |= {f"{name}_{k}": v for k, v in figures.items()}
                row[f"{name}_fake_cpu_cores"] = round(fake_cpu[-1], 2)
            rows.append(row)
    targets = []
    top = next((r for r in rows if r["concurrency"] == 256), rows[-1])
    fake_bound = top["isopool_fake_cpu_cores"] >= 0.9
    targets.append(target(f"chunks/s at {top['concurrency']} streams", round(top["isopool_chunks_per_s"]),
                          ">= 80,000 (or the fake provider is the limit)",
                          lambda v: v >= 80_000 or fake_bound))  # fmt: skip
    targets.append(target(f"streams in flight at {top['concurrency']}", round(top["isopool_in_flight"], 1),
                          f">= {0.95 * top['concurrency']:g}", lambda v: v >= 0.95 * top["concurrency"]))  # fmt: skip
    inputs = {"levels": levels, "seconds": seconds, "warmup": warmup, "tokens": tokens, "fake": "unpaced"}
    return result(inputs, {"rows": rows, "fake_provider_was_the_limit": fake_bound}, targets, started)


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["streams", "isopool chunks/s", "SDK chunks/s", "isopool in flight", "SDK in flight",
            "isopool TTFT ms", "SDK TTFT ms", "isopool CPU s/1k chunks", "SDK CPU s/1k chunks", "fake CPU"]  # fmt: skip
    rows = [
        [r["concurrency"], round(r["isopool_chunks_per_s"]), round(r["sdk_chunks_per_s"]),
         round(r["isopool_in_flight"], 1), round(r["sdk_in_flight"], 1),
         ms(r["isopool_ttft_p50"]), r["sdk_ttft_p50"] and ms(r["sdk_ttft_p50"]),
         round(r["isopool_cpu_per_1000_chunks"], 4), round(r["sdk_cpu_per_1000_chunks"], 4),
         f"{r['isopool_fake_cpu_cores']} / {r['sdk_fake_cpu_cores']}"]
        for r in data["figures"]["rows"]
    ]  # fmt: skip
    return head, rows
