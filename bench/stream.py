"""stream: one long stream (5,000 events) read directly with the SDK, through the pool's
low-level client (the provider's own JSON, no SDK objects), and through the drop-in shim
(the caller's SDK parses, as applications do); events/s and time to first event.

Target: pool events/s >= 0.9x direct for Anthropic, >= 1.0x for OpenAI."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai

from broker import Pool
from broker.fake_provider import LATENCY_HEADER, FakeProviderProcess
from broker.shim import Anthropic, OpenAI

from .common import ms, pick, result, target

ASK = [{"role": "user", "content": "hi"}]


def _time(stream: Callable[[], Iterator[Any]]) -> tuple[float, float, int]:
    """(seconds to the first event, seconds in all, events) of one stream read to the end."""
    start = time.perf_counter()
    events = iter(stream())
    next(events)
    first = time.perf_counter() - start
    count = 1 + sum(1 for _ in events)
    return first, time.perf_counter() - start, count


def _paths(pool: Pool, client: Any, url: str, provider: str, tokens: int) -> dict[str, Callable[[], Iterator[Any]]]:
    latency = {LATENCY_HEADER: f"tokens={tokens}"}
    if provider == "anthropic":
        args = {"model": "claude-bench", "max_tokens": tokens, "messages": ASK, "stream": True}
        direct, shim = anthropic.Anthropic(base_url=url, max_retries=0), Anthropic(pool=pool)
        method = "messages.create"
        make = lambda c: c.messages.create(**args, extra_headers=latency)  # noqa: E731
    else:
        args = {"model": "gpt-bench", "max_completion_tokens": tokens, "messages": ASK, "stream": True}
        direct, shim = openai.OpenAI(base_url=url + "/v1", max_retries=0), OpenAI(pool=pool)
        method = "chat.completions.create"
        make = lambda c: c.chat.completions.create(**args, extra_headers=latency)  # noqa: E731
    return {
        "direct SDK": lambda: make(direct),
        "pool client": lambda: client.submit(provider, method, extra_headers=latency, **args),
        "shim": lambda: make(shim),
    }


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    tokens, repeat = pick(size, (5000, 5), (5000, 2), (200, 1))
    rows, targets = [], []
    with FakeProviderProcess() as fake:
        profiles = {
            "anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 1},
            "openai": {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1},
        }
        with Pool(profiles=profiles) as pool, pool.client() as client:
            for provider, goal in (("anthropic", 0.9), ("openai", 1.0)):
                paths = _paths(pool, client, fake.url, provider, tokens)
                for make in paths.values():  # warm: a worker's first stream pays its copy-on-write faults
                    _time(make)
                runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in paths}
                for _ in range(repeat):  # in turn, so that drift in machine load hits every path alike
                    for name, make in paths.items():
                        runs[name].append(_time(make))
                direct_rate = statistics.median(n / total for _, total, n in runs["direct SDK"])
                direct_first = statistics.median(first for first, _, _ in runs["direct SDK"])
                for name, samples in runs.items():
                    rate = statistics.median(n / total for _, total, n in samples)
                    first = statistics.median(f for f, _, _ in samples)
                    rows.append({
                        "provider": provider, "path": name, "events": samples[0][2],
                        "events_per_s": round(rate), "ratio_to_direct": round(rate / direct_rate, 3),
                        "first_event_ms": ms(first), "first_event_added_ms": ms(first - direct_first),
                    })  # fmt: skip
                pool_row = next(r for r in rows if r["provider"] == provider and r["path"] == "pool client")
                targets.append(target(f"{provider}: pool events/s vs direct", pool_row["ratio_to_direct"],
                                      f">= {goal}x", lambda v, g=goal: v >= g))  # fmt: skip
    return result({"events_per_stream": tokens, "repeat": repeat}, {"rows": rows}, targets, started)


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["provider", "path", "events/s", "× direct", "first event ms", "first event added ms"]
    rows = [
        [r["provider"], r["path"], r["events_per_s"], r["ratio_to_direct"], r["first_event_ms"],
         r["first_event_added_ms"]]
        for r in data["figures"]["rows"]
    ]  # fmt: skip
    return head, rows
