"""Running the fake provider: in the foreground (`isopool fake-provider`) or as an owned child process."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from typing import Any

import msgspec
from aiohttp import web

from ..processes import Child, ChildFailed, say_ready, stop_signals
from ..protocol import Listening
from .faults import FaultPlan
from .server import FakeProvider, Latency


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    latency: Latency | None = None,
    rates: dict[str, float] | None = None,
    seed: int = 0,
    exit_on_stdin_eof: bool = False,
    prefix_cache: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT (or, for an owned child, until the parent's pipe closes)."""
    provider = FakeProvider(latency, FaultPlan(rates, seed), prefix_cache)
    runner = web.AppRunner(provider.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    url = "http://{}:{}".format(*runner.addresses[0][:2])
    if exit_on_stdin_eof:
        say_ready(msgspec.json.encode(Listening(url)).decode())
    else:
        print(f"listening {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in stop_signals():
        loop.add_signal_handler(sig, stop.set)
    if exit_on_stdin_eof:
        loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.buffer.read1(4096) or stop.set())
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


class FakeProviderProcess:
    """The fake provider as a child process owned by this one; a context manager.

    The child exits by itself if this process dies (it watches its stdin pipe)."""

    def __init__(
        self, latency: Latency | None = None, rates: dict[str, float] | None = None, seed: int = 0,
        prefix_cache: bool = False, host: str = "127.0.0.1",
    ) -> None:  # fmt: skip
        latency = latency or Latency()
        args = ["--host", host, "--ttft", str(latency.ttft), "--gap", str(latency.gap), "--tokens", str(latency.tokens)]
        args += ["--batched"] if latency.batched else []
        args += ["--prefix-cache"] if prefix_cache else []
        args += ["--load-knee", str(latency.knee), "--load-slope", str(latency.slope)] if latency.slope else []
        args += ["--seed", str(seed), "--owned"]
        for spec, rate in (rates or {}).items():
            args += ["--fault-rate", f"{spec}={rate}"]
        self._args = args
        self._child: Child | None = None
        self.url = ""

    def start(self) -> FakeProviderProcess:
        self._child = Child("broker.fake_provider", "--port", "0", *self._args, grace=2.0)
        try:
            self.url = self._child.handshake(Listening, "the fake provider").url
        except ChildFailed:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        return self._child.pid if self._child is not None else 0

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_isopool/stats", timeout=10) as resp:
            return json.load(resp)

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + "/_isopool/reset", method="POST"), timeout=10).close()

    def hold(self, held: bool = True) -> None:
        """Hold every stream before its first event (False: let them go on)."""
        request = urllib.request.Request(self.url + "/_isopool/hold", data=json.dumps({"hold": held}).encode(),
                                         headers={"content-type": "application/json"}, method="POST")  # fmt: skip
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop()
            self._child = None

    def __enter__(self) -> FakeProviderProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
