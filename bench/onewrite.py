"""onewrite: `isopool loadtest` against a bare one-process aiohttp client, both on a fake
provider that writes each SSE event in its own write (as real servers write each token),
500-token streamed chat completions, unpaced, in the same run: chunks/s as the server
counted them, streams in flight as each client counts them (the generator's own figure).

The bare client is the floor a load generator is measured against: N asyncio tasks on one
aiohttp session, each streaming requests back to back and parsing every chunk's JSON.
Target: at 256 streams the generator serves >= 0.8x the bare client's chunks/s with >= 95%
of its streams in flight (issue 16)."""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from typing import Any

import aiohttp

from broker.fake_provider import FakeProviderProcess
from broker.fake_provider.server import Latency
from broker.loadtest import Options
from broker.loadtest import run as loadtest

from .common import cpu_seconds, pick, result, target

SAMPLE_EVERY = 0.25  # seconds between two reads of the server's counters


class ServerCount:
    """Reads the fake's counters from a thread: the window opens `warmup` seconds after the
    first stream reaches the server and lasts `seconds`, whichever client is driving it."""

    def __init__(self, fake: FakeProviderProcess, warmup: float, seconds: float) -> None:
        self.fake, self.warmup, self.seconds = fake, warmup, seconds
        self.samples: list[tuple[float, int, int]] = []  # (monotonic time, chunks served, streams active)
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ServerCount:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self._thread.join()

    def _read(self) -> tuple[float, int, int]:
        stats = self.fake.stats()
        return time.monotonic(), stats["chunks"], stats["active"]

    def _watch(self) -> None:
        while not self.done.is_set() and self._read()[2] == 0:
            time.sleep(0.05)
        opens = time.monotonic() + self.warmup
        while not self.done.is_set() and time.monotonic() < opens:
            time.sleep(0.05)
        closes = opens + self.seconds
        while not self.done.is_set() and time.monotonic() < closes:
            self.samples.append(self._read())
            time.sleep(min(SAMPLE_EVERY, max(0.0, closes - time.monotonic())))
        if not self.done.is_set():
            self.samples.append(self._read())
        self.done.set()

    def figures(self) -> dict[str, Any]:
        """Chunks/s served over the window, and the streams the server was still writing (a
        client too slow to read leaves the server idle: its answers wait in socket buffers)."""
        if len(self.samples) < 2:
            return {"server_chunks_per_s": 0.0, "server_writing": 0.0, "window_s": 0.0, "in_flight": 0.0}
        (t0, c0, _), (t1, c1, _) = self.samples[0], self.samples[-1]
        writing = sum(s[2] for s in self.samples) / len(self.samples)
        return {"server_chunks_per_s": (c1 - c0) / (t1 - t0), "server_writing": writing,
                "window_s": round(t1 - t0, 2), "in_flight": 0.0}  # fmt: skip


async def _bare_lanes(url: str, concurrency: int, tokens: int, done: threading.Event) -> list[tuple[float, float]]:
    """`concurrency` tasks on one aiohttp session streaming until `done`, parsing every chunk;
    returns when each request was sent and when it ended."""
    body = {"model": "gpt-bench", "max_tokens": tokens, "stream": True,
            "messages": [{"role": "user", "content": "bare client"}]}  # fmt: skip
    spans: list[tuple[float, float]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def lane() -> None:
            while not done.is_set():
                sent = time.monotonic()
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    async for line in response.content:
                        if line.startswith(b"data: {"):
                            json.loads(line[6:])
                        if done.is_set():
                            break
                spans.append((sent, time.monotonic()))

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return spans


def _bare(fake: FakeProviderProcess, concurrency: int, seconds: float, warmup: float, tokens: int) -> dict[str, Any]:
    with ServerCount(fake, warmup, seconds) as count:
        spans = asyncio.run(_bare_lanes(fake.url, concurrency, tokens, count.done))
    figures = count.figures()
    if figures["window_s"]:
        opens, closes = count.samples[0][0], count.samples[-1][0]
        busy = sum(max(0.0, min(end, closes) - max(sent, opens)) for sent, end in spans)
        figures["in_flight"] = busy / (closes - opens)
    return figures


def _isopool(fake: FakeProviderProcess, concurrency: int, seconds: float, warmup: float, tokens: int) -> dict[str, Any]:
    """`isopool loadtest --target URL -c N`, long enough to cover the server's window (it starts
    counting at the first stream, after the generator's own start-up)."""
    options = Options(target=fake.url + "/v1", concurrency=[concurrency], duration=warmup + seconds + 2.0,
                      warmup=warmup, output_tokens=str(tokens), input_tokens="8", calibrate=False)  # fmt: skip
    with ServerCount(fake, warmup, seconds) as count, tempfile.TemporaryDirectory() as out:
        point = loadtest(options, out)["points"][0]
    generator = point["generator"]
    reported = {"reported_chunks_per_s": point["summary"]["throughput"]["chunks_per_s"],
                "in_flight": generator["in_flight_mean"] or 0.0, "verdict": generator["verdict"]}  # fmt: skip
    return count.figures() | reported


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    levels, seconds, warmup, tokens = pick(size, ((64, 256), 10.0, 3.0, 500), ((64, 256), 5.0, 1.5, 500),
                                           ((8,), 0.6, 0.2, 50))  # fmt: skip
    rows = []
    with FakeProviderProcess(Latency(tokens=1_000_000)) as fake:  # max_tokens decides the length; unpaced
        for concurrency in levels:
            row: dict[str, Any] = {"concurrency": concurrency}
            for name, measure in (("bare", _bare), ("isopool", _isopool)):
                before, t0 = cpu_seconds(fake.pid), time.monotonic()
                row |= {f"{name}_{k}": v for k, v in measure(fake, concurrency, seconds, warmup, tokens).items()}
                row[f"{name}_fake_cpu_cores"] = round((cpu_seconds(fake.pid) - before) / (time.monotonic() - t0), 2)
            row["ratio"] = row["isopool_server_chunks_per_s"] / max(row["bare_server_chunks_per_s"], 1.0)
            rows.append(row)
    top = next((r for r in rows if r["concurrency"] == 256), rows[-1])
    targets = [
        target(f"isopool / bare client chunks/s at {top['concurrency']} streams", round(top["ratio"], 3), ">= 0.8",
               lambda v: v >= 0.8),
        target(f"isopool streams in flight at {top['concurrency']}", round(top["isopool_in_flight"], 1),
               f">= {0.95 * top['concurrency']:g}", lambda v: v >= 0.95 * top["concurrency"]),
    ]  # fmt: skip
    inputs = {"levels": levels, "seconds": seconds, "warmup": warmup, "tokens": tokens, "fake": "one event per write"}
    return result(inputs, {"rows": rows}, targets, started)


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["streams", "bare chunks/s", "isopool chunks/s", "ratio", "bare in flight", "isopool in flight",
            "server writing", "isopool reported chunks/s", "fake CPU"]  # fmt: skip
    rows = [
        [r["concurrency"], round(r["bare_server_chunks_per_s"]), round(r["isopool_server_chunks_per_s"]),
         round(r["ratio"], 3), round(r["bare_in_flight"], 1), round(r["isopool_in_flight"], 1),
         f"{r['bare_server_writing']:.1f} / {r['isopool_server_writing']:.1f}",
         round(r["isopool_reported_chunks_per_s"]), f"{r['bare_fake_cpu_cores']} / {r['isopool_fake_cpu_cores']}"]
        for r in data["figures"]["rows"]
    ]  # fmt: skip
    return head, rows
