"""Not a scenario; a measurement behind issue 21's profile: the CPU and time one request costs the
worker's HTTP client (the SDK's async httpx2 client, as worker/main.py builds it) against aiohttp's,
in one process, in turn, against the fake provider: `count_tokens` and an 8-token stream read to
its end. The worker makes one such request for every shim or gateway call.

    python -m bench.httpclients [--requests 500] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from collections.abc import Awaitable, Callable

import aiohttp
import anthropic

from broker.fake_provider import FakeProviderProcess, Latency

HEADERS = {"content-type": "application/json", "x-api-key": "bench-key", "anthropic-version": "2023-06-01"}
ASK = b'"messages":[{"role":"user","content":"hi"}]'
CALLS = {
    "count_tokens": ("/v1/messages/count_tokens", b'{"model":"claude-bench",' + ASK + b"}"),
    "stream, 8 tokens": ("/v1/messages", b'{"model":"claude-bench","max_tokens":8,"stream":true,' + ASK + b"}"),
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _per_request(one: Callable[[], Awaitable[None]], n: int) -> tuple[float, float]:
    """(µs of CPU, µs of wall time) per request, after 50 to warm up."""
    for _ in range(50):
        await one()
    cpu, start = _cpu(), time.perf_counter()
    for _ in range(n):
        await one()
    return (_cpu() - cpu) / n * 1e6, (time.perf_counter() - start) / n * 1e6


async def _measure(url: str, n: int, rounds: int) -> None:
    http = anthropic.DefaultAsyncHttpxClient()
    async with aiohttp.ClientSession() as session:
        for round_ in range(rounds):
            for name, (path, body) in CALLS.items():

                async def httpx2(path: str = path, body: bytes = body) -> None:
                    request = http.build_request("POST", url + path, headers=HEADERS, content=body)
                    response = await http.send(request, stream=True)
                    async for _ in response.aiter_bytes():
                        pass
                    await response.aclose()

                async def plain(path: str = path, body: bytes = body) -> None:
                    async with session.post(url + path, data=body, headers=HEADERS) as response:
                        async for _ in response.content.iter_any():
                            pass

                for client, one in (("httpx2 (the worker's)", httpx2), ("aiohttp", plain)):
                    cpu, wall = await _per_request(one, n)
                    print(f"round {round_} {name:17} {client:22} CPU {cpu:7.1f} µs/request, wall {wall:7.1f} µs")
    await http.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.httpclients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with FakeProviderProcess(Latency(tokens=1_000_000)) as fake:
        asyncio.run(_measure(fake.url, args.requests, args.rounds))


if __name__ == "__main__":
    main()
