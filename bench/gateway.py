"""gateway: the official SDKs pointed at isopool's HTTP gateway and at LiteLLM's proxy (one
worker, no database), next to the same SDKs calling the upstream directly, in turn in one run:
p50/p99 of `messages.count_tokens`, an 8-token Anthropic stream and a one-token OpenAI chat
stream; events/s of one long stream (Anthropic and OpenAI); CPU per call or per event of the
caller, the gateway, the broker, the worker and LiteLLM's proxy. Upstreams: the fake provider and
a plain aiohttp server written apart from it, each its own process, writing one event per write.
LiteLLM runs from a virtual environment of its own (bench/litellm_proxy.py); where it cannot, its
column says why.

Targets (issue 21, on the fake): <= 0.3 ms added at the median; p99 <= 1.5x direct + 1 ms; a long
stream >= 0.9x the direct SDK's events/s; the gateway ahead of LiteLLM's proxy on every figure. A bare gateway
(bench/floor.py: aiohttp's low-level server in front of a bare broker and relay) runs in the same run: the
floor under the first two targets."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any

import anthropic
import openai

from broker import Pool
from broker.http.gateway import PROFILE_HEADER

from . import floor, litellm_proxy, sidebyside
from .common import pick, result, target
from .sidebyside import UPSTREAMS, Clients, Path, Processes
from .upstreams import child_of, direct, profile, profiles, upstreams, worker_pids

PATH, LITELLM = "isopool gateway", "LiteLLM proxy"


def path(url: str, name: str = PATH) -> Path:
    """The official SDKs at the gateway at `url`, to each upstream's profiles (by header)."""

    def clients(upstream: str) -> Clients:
        headers = {PROFILE_HEADER: profile("anthropic", upstream)}
        return Clients(anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, default_headers=headers),
                       openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                     default_headers={PROFILE_HEADER: profile("openai", upstream)}))  # fmt: skip

    return Path.of(name, clients)


def _models(servers: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """LiteLLM's model names: claude-<upstream> and gpt-<upstream>, the fake's being claude-bench and gpt-bench."""
    out = {}
    for name, server in servers.items():
        tag = "bench" if name == "fake" else name
        out[f"claude-{tag}"] = ("anthropic", server.url)
        out[f"gpt-{tag}"] = ("openai", server.url + "/v1")
    return out


def _litellm(url: str, key: str) -> Path:
    def clients(upstream: str) -> Clients:
        tag = "bench" if upstream == "fake" else upstream  # as _models names them
        sdks = (
            anthropic.Anthropic(base_url=url, api_key=key, max_retries=0),
            openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0),
        )
        return Clients(*sdks, f"claude-{tag}", f"gpt-{tag}")

    return Path.of(LITELLM, clients)


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    sizes = sidebyside.size_of(size, pick)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(upstreams())
        pool = stack.enter_context(Pool(profiles=profiles(servers), http="127.0.0.1:0"))
        client = stack.enter_context(pool.client())
        bare, bare_pids = stack.enter_context(floor.bare_paths(servers, gateway=True))
        paths = [direct(servers), path(pool.http_url), *bare]
        fixed = {"caller": [os.getpid()], "gateway": [child_of(pool.pid, "broker.http.gateway"), *bare_pids["gateway"]],
                 "broker": [pool.pid, *bare_pids["broker"]], "upstream": [s.pid for s in servers.values()]}  # fmt: skip
        if size == "tiny":
            paths.append(Path(LITELLM, {}, skipped="not run at the tiny size (the test suite's smoke run)"))
        else:
            try:
                log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-litellm-"))
                proxy, key = stack.enter_context(litellm_proxy.proxy(_models(servers), log_dir))
                paths.append(_litellm(proxy.url, key))
                fixed["litellm"] = litellm_proxy.pids(proxy.pid)
                notes.append(f"LiteLLM {litellm_proxy.version(litellm_proxy.python())} proxy: one worker, no "
                             "database, its own virtual environment")  # fmt: skip
            except litellm_proxy.Unavailable as exc:
                paths.append(Path(LITELLM, {}, skipped=str(exc)))
        stack.callback(sidebyside.close, [p for p in paths if not p.skipped])
        processes = Processes(fixed, lambda: worker_pids(client) + bare_pids["worker"])  # the caller's own CPU only
        for upstream in UPSTREAMS:
            rows += sidebyside.measure(paths, processes, upstream, sizes)
    inputs = {**sizes, "upstreams": list(UPSTREAMS), "paths": [p.name for p in paths]}
    data = result(inputs, {"rows": rows}, [*sidebyside.targets(rows, PATH), *_versus_litellm(rows)], started)
    data["notes"] = notes + [f"{p.name} skipped: {p.skipped}" for p in paths if p.skipped]
    return data


def _versus_litellm(rows: list[dict[str, Any]]) -> list:
    """The gateway ahead of LiteLLM's proxy on every figure of the fake's rows (none when it did not run):
    lower p50 and p99, more events/s, less CPU of its own processes (gateway + broker + worker vs proxy)."""
    out = []
    for row in rows:
        ours, theirs = row["paths"][PATH], row["paths"].get(LITELLM, {"skipped": ""})
        if row["upstream"] != "fake" or "skipped" in theirs:
            continue
        name = f"gateway vs LiteLLM: {row['call']}"
        figures = [("p50", "median_ms"), ("p99", "p99_ms")] if row["kind"] == "latency" else []
        for label, key in figures:
            out.append(target(f"{name}: {label} ratio", round(ours[key] / theirs[key], 3), "< 1", lambda v: v < 1))
        if row["kind"] == "rate":
            ratio = round(sidebyside.paired_ratio(ours, theirs), 3)
            out.append(target(f"{name}: events/s ratio", ratio, "> 1", lambda v: v > 1))
        cpu = sum(ours["cpu_us"].get(r, 0.0) for r in ("gateway", "broker", "worker"))
        ratio = round(cpu / max(theirs["cpu_us"]["litellm"], 0.1), 3)
        out.append(target(f"{name}: CPU of the relay ratio", ratio, "< 1", lambda v: v < 1))
    return out


table = sidebyside.table
