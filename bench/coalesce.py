"""The setting coalesce_ms measured (issue 21): pools alike but for it (0: a message per read, and each
window asked for), the shim and the gateway through each, next to the direct SDK, in turn in one run
(bench/sidebyside.py): added p50/p99 of the tiny calls, events/s and CPU per event of a long stream.

    python -m bench.coalesce [--size quick|full|tiny] [--window-ms 1 2] [--out FILE]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.coalesce", description=__doc__)
    parser.add_argument("--size", choices=("full", "quick", "tiny"), default="quick")
    parser.add_argument("--window-ms", type=float, nargs="+", default=[1.0])
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    sizes = sidebyside.size_of(args.size, pick)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(upstreams())
        pools = {f"{ms:g} ms": stack.enter_context(Pool(profiles=profiles(servers), http="127.0.0.1:0", coalesce_ms=ms))
                 for ms in [0.0, *args.window_ms]}  # fmt: skip
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
    data = result({**sizes, "windows_ms": args.window_ms}, {"rows": rows}, [], started)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
    show(Console(width=150), "coalesce", sys.modules[__name__], data)


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One line per call and path: what coalescing changes. CPU in µs per call (per event for a long stream):
    the relay's (gateway, broker, worker) and the caller's (the SDK, and the shim's client)."""
    head = ["upstream", "call", "path", "p50 ms", "added p50 ms", "p99 ms", "events/s", "× direct", "relay CPU µs",
            "caller CPU µs"]  # fmt: skip
    rows = []
    for row in data["figures"]["rows"]:
        for name, fig in row["paths"].items():
            cpu = fig["cpu_us"]
            relay = round(sum(cpu[role] for role in ("gateway", "broker", "worker")), 1)
            figures = ("median_ms", "added_median_ms", "p99_ms", "events_per_s", "ratio_to_direct")
            rows.append([row["upstream"], row["call"][:24], name, *map(fig.get, figures), relay, cpu["caller"]])
    return head, rows


if __name__ == "__main__":
    main()
