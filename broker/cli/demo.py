"""`isopool demo`: a few hundred mixed requests through a pool against a fake provider that
stalls, resets and errors on a share of them; every answer is checked against the
fake provider's deterministic content.

A stream that stalls or loses its connection after the caller has seen some of it is
not silently restarted by the pool (StreamStalled, ProviderConnectionError); the demo
then does what caller code should do, re-asks, and counts it. A request is *lost* if
it never gets an answer, *wrong* if its answer differs from what the provider would
have said without faults.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..client.client import AsyncClient
from ..client.pool import Pool
from ..errors import ProviderConnectionError, RequestError, StreamStalled
from ..fake_provider import FakeProviderProcess, Latency
from ..fake_provider.content import Reply

DEMO_KEY_ENV = "ISOPOOL_DEMO_API_KEY"  # the fake provider accepts any key
SDK_DEFAULT_TIMEOUT = 600.0  # what a stalled plain-SDK stream waits at least (pings reset the read timeout)
REASKED = "re-asked"  # tally key: a stream broken after output, asked again by the caller


def request_shape(i: int) -> tuple[str, str, dict[str, Any], bool]:
    """Request number i: (profile, method, kwargs, stream), cycling through the APIs."""
    prompt = [{"role": "user", "content": f"demo request {i}"}]
    kind = i % 5
    if kind == 0:
        return "anthropic", "messages.create", {"model": "claude-demo", "max_tokens": 64, "messages": prompt}, False
    if kind == 1:
        return "anthropic", "messages.create", {"model": "claude-demo", "max_tokens": 64, "messages": prompt}, True
    if kind == 2:
        return "openai", "chat.completions.create", {"model": "gpt-demo", "messages": prompt}, False
    if kind == 3:
        return "openai", "chat.completions.create", {"model": "gpt-demo", "messages": prompt}, True
    return "openai", "responses.create", {"model": "gpt-demo", "input": f"demo request {i}"}, False


def answer_text(method: str, stream: bool, events: list[Any], body: Any) -> str:
    """The answer's text, from the final body or from the stream's deltas."""
    if not stream:
        if method == "messages.create":
            return "".join(b.get("text", "") for b in body["content"])
        if method == "responses.create":
            return body["output"][0]["content"][0]["text"]
        return body["choices"][0]["message"]["content"]
    if method == "messages.create":
        return "".join(e["delta"].get("text", "") for e in events if e.get("type") == "content_block_delta")
    return "".join((c["delta"].get("content") or "") for e in events for c in e.get("choices", []))


async def _one(client: AsyncClient, i: int, tokens: int, tally: Counter, failures: list[str]) -> float:
    profile, method, kwargs, stream = request_shape(i)
    expected = Reply(kwargs, tokens).text
    start = time.monotonic()
    for _ in range(3):
        try:
            call = await client.submit(profile, method, stream=stream, **kwargs)
            events = [e.json() async for e in call] if stream else []
            result = await call.result()
            text = answer_text(method, stream, events, None if stream else result.json())
            tally["ok" if text == expected else "wrong"] += 1
            return time.monotonic() - start
        except (StreamStalled, ProviderConnectionError) as exc:
            if not exc.delivered:  # the pool already retried what it could; this is final
                tally[f"failed: {exc.code}"] += 1
                failures.append(str(exc))
                return time.monotonic() - start
            tally[REASKED] += 1
        except RequestError as exc:
            tally[f"failed: {exc.code}"] += 1
            failures.append(str(exc))
            return time.monotonic() - start
    tally["failed: still stalled after 3 asks"] += 1
    return time.monotonic() - start


async def _drive(url: str, requests: int, concurrency: int, tokens: int, progress: Callable[[Counter], None]) -> dict:
    tally: Counter[str] = Counter()
    latencies: list[float] = []
    failures: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    order = list(range(requests))
    random.Random(1).shuffle(order)

    async def task(i: int) -> None:
        async with sem:
            latencies.append(await _one(client, i, tokens, tally, failures))
            progress(tally)

    async with AsyncClient(url) as client:
        await asyncio.gather(*(task(i) for i in order))
        stats = await client.stats()
    return {"tally": tally, "latencies": sorted(latencies), "failures": failures[:5], "stats": stats}


def run_demo(
    requests: int = 300,
    concurrency: int = 24,
    stall_rate: float = 0.06,
    reset_rate: float = 0.02,
    error_rate: float = 0.02,
    stale_timeout: float = 1.0,
    seed: int = 7,
    progress: Callable[[Counter], None] = lambda tally: None,
) -> dict[str, Any]:
    """Run the whole demo and return its summary (what `isopool demo --json` prints)."""
    tokens = 24
    third = stall_rate / 3
    rates = {
        "stall-ping:after=4,interval=0.2": third,
        "stall-comment:after=4,interval=0.2": third,
        "stall-first:interval=0.2": third,
        "reset:after=6": reset_rate,
        "http-500": error_rate / 2,
        "http-429:retry_after=0": error_rate / 2,
    }
    # With ~8% of attempts broken on purpose, 3 attempts leave one request in ~5 runs
    # unanswered by chance (0.08^2 per broken request); 5 attempts make that ~1 in 1,000.
    # A request whose retry is silent too ends in a typed error (a silent provider is retried
    # once): 2 runs of 7 had one or two on 2026-12-03, all answered correctly otherwise.
    limits = {"stale_timeout": stale_timeout, "first_event_timeout": 2 * stale_timeout, "max_attempts": 5}
    os.environ.setdefault(DEMO_KEY_ENV, "demo-key-for-the-fake-provider")
    per_profile = {"min_workers": 2, "max_workers": concurrency, "spare_workers": 2, "api_key_env": DEMO_KEY_ENV}
    started = time.monotonic()
    with FakeProviderProcess(Latency(ttft=0.05, gap=0.01, tokens=tokens), rates, seed) as fake:
        profiles = {
            "anthropic": {"kind": "anthropic", "base_url": fake.url, **per_profile},
            "openai": {"kind": "openai", "base_url": fake.url + "/v1", **per_profile},
        }
        with Pool(profiles=profiles, **limits) as pool:
            ready = time.monotonic() - started
            run_start = time.monotonic()
            outcome = asyncio.run(_drive(pool.url, requests, concurrency, tokens, progress))
            wall = time.monotonic() - run_start
        injected = fake.stats()["faults"]
    return _summary(requests, outcome, injected, wall, ready, limits)


def _summary(requests: int, outcome: dict, injected: dict, wall: float, ready: float, limits: dict) -> dict[str, Any]:
    tally, lat, stats = outcome["tally"], outcome["latencies"], outcome["stats"]
    answered = sum(v for k, v in tally.items() if k != REASKED)
    stalls = sum(v for k, v in injected.items() if k.startswith("stall"))
    detected = stats["stalls"]
    lost = sum(n * limits.get(reason, 0.0) for reason, n in detected.items())  # each detection waited its limit
    return {
        "requests": requests,
        "ok": tally["ok"],
        "wrong": tally["wrong"],
        "failed": {k: v for k, v in tally.items() if k.startswith("failed")},
        "failure_examples": outcome["failures"],
        "lost": requests - answered,
        "re_asked_after_broken_stream": tally[REASKED],
        "faults_injected": injected,
        "stalls_detected": stats["stalls"],
        "workers_killed": stats["kills"],
        "workers_respawned": stats["respawns"],
        "pool_retries": stats["retries"],
        "latency_p50_s": round(lat[len(lat) // 2], 4) if lat else None,
        "latency_p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 4) if lat else None,
        "wall_s": round(wall, 2),
        "startup_s": round(ready, 2),
        "time_lost_to_stalls_s": round(lost, 1),
        "time_plain_sdk_would_lose_s": round(stalls * SDK_DEFAULT_TIMEOUT, 1),
    }
