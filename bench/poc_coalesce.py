"""PROOF OF CONCEPT, not a scenario (issue 21): main's worker against the same worker sending a
stream's events coalesced (worker/coalesce.py, $ISOPOOL_COALESCE_MS), in turn in one run: two
pools on the same upstreams, the shim and the gateway through each, next to the direct SDK.

    python -m bench.poc_coalesce [--size quick|full|tiny] [--window-ms 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

from rich.console import Console

from broker import Pool

from . import gateway, shim, sidebyside
from .__main__ import show
from .common import pick, result
from .sidebyside import UPSTREAMS, Processes
from .upstreams import child_of, direct, profiles, upstreams, worker_pids


def _pool(stack: contextlib.ExitStack, servers: dict[str, Any], window_ms: float) -> Pool:
    """A pool whose workers coalesce with `window_ms` (0: main's behaviour); the env is theirs from the start."""
    os.environ["ISOPOOL_COALESCE_MS"] = str(window_ms)
    try:
        return stack.enter_context(Pool(profiles=profiles(servers), http="127.0.0.1:0"))
    finally:
        del os.environ["ISOPOOL_COALESCE_MS"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.poc_coalesce", description=__doc__)
    parser.add_argument("--size", choices=("full", "quick", "tiny"), default="quick")
    parser.add_argument("--window-ms", type=float, default=1.0)
    parser.add_argument("--json", help="also write the run's figures here")
    args = parser.parse_args(argv)
    sizes = sidebyside.size_of(args.size, pick)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(upstreams())
        coalesced = f"coalesced {args.window_ms:g} ms"
        pools = {"main": _pool(stack, servers, 0), coalesced: _pool(stack, servers, args.window_ms)}
        clients = [stack.enter_context(pool.client()) for pool in pools.values()]
        paths = [direct(servers)]
        paths += [shim.path(pool, f"shim, {name}") for name, pool in pools.items()]
        paths += [gateway.path(pool.http_url, f"gateway, {name}") for name, pool in pools.items()]
        stack.callback(sidebyside.close, paths)
        fixed = {"caller": [os.getpid()], "gateway": [child_of(p.pid, "broker.http.gateway") for p in pools.values()],
                 "broker": [p.pid for p in pools.values()], "upstream": [s.pid for s in servers.values()]}  # fmt: skip
        processes = Processes(fixed, lambda: [pid for c in clients for pid in worker_pids(c)])
        for upstream in UPSTREAMS:
            rows += sidebyside.measure(paths, processes, upstream, sizes)
    data = result({**sizes, "window_ms": args.window_ms}, {"rows": rows}, [], started)
    show(Console(stderr=True, width=160), "poc_coalesce", sys.modules[__name__], data)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shim": data}, f, indent=2)  # under "shim": the summaries read it as one


table = sidebyside.table

if __name__ == "__main__":
    main()
