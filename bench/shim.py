"""shim: the drop-in shim (`broker.shim.Anthropic` / `OpenAI`, synchronous, as applications use
it) against the same official SDK calling the upstream directly, in turn in one run: p50/p99 of
`messages.count_tokens`, an 8-token Anthropic stream and a one-token OpenAI chat stream; events/s
of one long stream (Anthropic and OpenAI); CPU per call or per event of the caller, the broker and
the worker. Upstreams: the fake provider and a plain aiohttp server written apart from it, each
its own process, writing one event per write.

Targets (issue 21, on the fake): <= 0.3 ms added at the median; p99 <= 1.5x direct + 1 ms; a long
stream >= 0.9x the direct SDK's events/s. Two more paths measure, in the same run, what a bare process hop
and a bare broker add (bench/floor.py): the floor under the first target."""

from __future__ import annotations

import os
import time
from typing import Any

from broker import Pool
from broker import shim as isoshim

from . import floor, sidebyside
from .common import pick, result
from .sidebyside import UPSTREAMS, Clients, Path, Processes
from .upstreams import direct, profile, profiles, upstreams, worker_pids

PATH = "shim"


def path(pool: Pool, name: str = PATH) -> Path:
    """The shim's clients of `pool`, to each upstream's profiles."""

    def clients(upstream: str) -> Clients:
        return Clients(isoshim.Anthropic(pool=pool, pool_profile=profile("anthropic", upstream)),
                       isoshim.OpenAI(pool=pool, pool_profile=profile("openai", upstream)))  # fmt: skip

    return Path.of(name, clients)


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    sizes = sidebyside.size_of(size, pick)
    rows: list[dict[str, Any]] = []
    with upstreams() as servers, Pool(profiles=profiles(servers)) as pool, pool.client() as client, \
            floor.bare_paths(servers) as (bare, bare_pids):  # fmt: skip
        paths = [direct(servers), path(pool), *bare]
        upstream_pids = [s.pid for s in servers.values()]
        processes = Processes({"caller": [os.getpid()], "broker": [pool.pid, *bare_pids["broker"]],
                               "upstream": upstream_pids},
                              lambda: worker_pids(client) + bare_pids["worker"])  # fmt: skip
        try:
            for upstream in UPSTREAMS:
                rows += sidebyside.measure(paths, processes, upstream, sizes)
        finally:
            sidebyside.close(paths)
    inputs = {**sizes, "upstreams": list(UPSTREAMS), "paths": [p.name for p in paths]}
    return result(inputs, {"rows": rows}, sidebyside.targets(rows, PATH), started)


table = sidebyside.table
