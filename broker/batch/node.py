"""One pool per Ray node: the actor that runs the items the driver deals it.

The actor owns an embedded `Pool` (broker, zygote, workers) on its node; when the actor
dies, its pool goes with it (Ray ends the actor's process tree, and a broker whose stdin
closes stops anyway). Stalls and
retries stay inside that broker, as on one machine. Results go back to the driver one
by one as they are in (a streaming generator), so one slow item does not hold back
the others of its chunk; the driver alone writes them down.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ..client.client import AsyncClient
from ..client.pool import Pool
from ..config import Settings
from ..protocol import Snapshot
from .execute import Counters, Settler
from .formats import Item
from .lane import Lane

MAX_SESSION_PATH = 70  # + "/isopool-XXXXXXXX/frontend.sock" stays within the 107 bytes of a socket path


def session_run_dir() -> str:
    """The pool's socket directory, in this node's Ray session directory: Ray kills an actor's
    whole process tree, so a pool whose actor is killed cannot remove its sockets, and there
    they go with the Ray session's own. In the system's temp dir if the path would be too long."""
    try:
        from ray._private.worker import global_worker

        session = global_worker.node.get_session_dir_path()
    except (ImportError, AttributeError):  # a Ray without it: the default place
        session = ""
    if not session or len(session) > MAX_SESSION_PATH:
        session = tempfile.gettempdir()
    return tempfile.mkdtemp(prefix="isopool-", dir=session)


class NodePool:
    """Created by the driver, pinned to one node: `start`, then `run` chunks, `stats`, `close`."""

    def __init__(
        self, settings: bytes, kind: str, concurrency: int | None, retry_budget: int, metrics_port: int | None
    ) -> None:
        self.settings = msgspec.json.decode(settings, type=Settings)
        self.kind, self.concurrency, self.retry_budget, self.metrics_port = (
            kind,
            concurrency,
            retry_budget,
            metrics_port,
        )
        self.pool: Pool | None = None
        self.client: AsyncClient | None = None
        self.settler: Settler | None = None
        self.before: Snapshot | None = None

    async def start(self) -> dict[str, Any]:
        """Start this node's pool; what the driver needs to know about the node."""
        import ray

        ip = ray.util.get_node_ip_address()
        metrics = f"{ip}:{self.metrics_port}" if self.metrics_port is not None else ""
        settings = msgspec.structs.replace(self.settings, run_dir=session_run_dir(), metrics=metrics)
        self.pool = await asyncio.to_thread(Pool(settings).start)
        self.client = AsyncClient(self.pool.url)
        self.before = await self.client.snapshot()
        limit = self.concurrency or self.before.capacity[self.kind]  # default: what the workers carry
        self.settler = Settler(self.client, Lane(limit), self.retry_budget)
        return {
            "limit": limit,
            "ip": ip,
            "pid": os.getpid(),
            "pool_pid": self.pool.pid,
            "metrics_url": self.pool.metrics_url,
        }

    async def run(self, items: list[Item]) -> AsyncIterator[dict[str, Any]]:
        """Each item's result line, in the order they finish."""
        assert self.settler is not None, "start() first"
        tasks = [asyncio.create_task(self.settler(item)) for item in items]
        for finished in asyncio.as_completed(tasks):
            yield await finished

    async def stats(self) -> Counters:
        """This node's counters since the start: stalls recovered, retries, throttling."""
        assert self.client is not None and self.settler is not None and self.before is not None, "start() first"
        return self.settler.counters(self.before, await self.client.snapshot())

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.pool is not None:
            await asyncio.to_thread(self.pool.stop)
