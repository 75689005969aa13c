"""The upstreams of a `shim` or `gateway` run, each a process of its own: the fake provider, and
the plain server written apart from it (bench/plainsse.py); the pool's profiles for both, and
the direct SDK's clients to both (the baseline path)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import openai
import psutil

from broker.fake_provider import FakeProviderProcess, Latency

from .common import base_url
from .owned import OwnedServer, first_line
from .sidebyside import Clients, Path

PLAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plainsse.py")


@contextmanager
def upstreams() -> Iterator[dict[str, Any]]:
    """{"fake": FakeProviderProcess, "plain": OwnedServer}, both unpaced, one event per write; an
    answer is as long as its max_tokens."""
    plain = OwnedServer([sys.executable, "-P", PLAIN], first_line, "the plain SSE server", 30.0)
    with FakeProviderProcess(Latency(tokens=1_000_000)) as fake, plain:
        yield {"fake": fake, "plain": plain}


def profile(kind: str, upstream: str) -> str:
    return kind if upstream == "fake" else f"{kind}-{upstream}"


def profiles(servers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One Anthropic and one OpenAI profile per upstream, one worker each (the fake's are the defaults)."""
    out = {}
    for name, server in servers.items():
        for kind in ("anthropic", "openai"):
            out[profile(kind, name)] = {"kind": kind, "base_url": base_url(server.url, kind), "min_workers": 1,
                                        "max_workers": 1}  # fmt: skip
    return out


def direct(servers: dict[str, Any]) -> Path:
    """The baseline: the official SDKs straight at each upstream."""
    return Path.of("direct SDK", lambda upstream: Clients(
        anthropic.Anthropic(base_url=servers[upstream].url, max_retries=0),
        openai.OpenAI(base_url=servers[upstream].url + "/v1", max_retries=0)))  # fmt: skip


def worker_pids(client: Any) -> list[int]:
    return [w.pid for w in client.snapshot().workers if w.pid]


def child_of(pid: int, module: str) -> int:
    """The pid of `pid`'s child running `module` (the broker's gateway), 0 if none."""
    for child in psutil.Process(pid).children():
        if module in " ".join(child.cmdline()):
            return child.pid
    return 0
