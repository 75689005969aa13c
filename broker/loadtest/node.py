"""One load generator per Ray node: the actor that runs its share of each point (`--ray`).

The actor owns a generator pool on its node (broker, zygote, workers: `target_pool`), as a
run on one machine does, so every request is timed in a worker of that node by that node's
clock, and a stall is cut by that node's workers. Records go back to the driver while the point
runs, in small batches (whatever ended since the last one was taken), so that the driver
writes them as they end; the generator's samples (CPU, loop lag, in flight) go with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ..batch.node import session_run_dir
from .machine import machine
from .options import Options, Workload
from .runner import calibrate, drive_point, target_pool
from .schedule import Share


class Batch(msgspec.Struct):
    """Records that ended and samples taken since the last batch."""

    records: list[dict[str, Any]]
    samples: list[dict[str, Any]]


class PointEnd(msgspec.Struct):
    """The last item of a point's stream: how the generator did over the whole point."""

    lags: list[float]
    cpu_cores: float


class NodeStarted(msgspec.Struct):
    """What the driver learns of a node once its pool is up."""

    ip: str
    pid: int
    workers: int
    streams_per_worker: int
    machine: dict[str, Any]


class _Relay:
    """The generator's records and samples, queued for the point's stream (a `Progress`)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()

    def note(self, text: str) -> None:
        pass

    def point(self, label: str, total: int | None, seconds: float | None) -> None:
        pass

    def record(self, record: dict[str, Any]) -> None:
        self.queue.put_nowait(("record", record))

    def sample(self, sample: dict[str, Any]) -> None:
        self.queue.put_nowait(("sample", sample))

    async def batches(self) -> AsyncIterator[Batch]:
        """Until the end (None): each time something is queued, all that is queued by then."""
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            found = [item for item in items if item is not None]
            if found:
                yield Batch([r for kind, r in found if kind == "record"], [s for kind, s in found if kind == "sample"])
            if len(found) < len(items):
                return


class NodeGenerator:
    """Created by the driver, pinned to one node: `start`, `calibrate`, `clock`, `run_point`, `close`.

    `options` (JSON) are the node's: sized for its share (its pool, its calibration); `workload` is
    what it sends (seeded for this node); `fake_url` is the built-in fake the driver started."""

    def __init__(self, options: bytes, workload: Workload, fake_url: str) -> None:
        self.options = msgspec.json.decode(options, type=Options)
        self.workload, self.fake_url = workload, fake_url
        self.stack = contextlib.ExitStack()
        self.pool: Any = None
        self.profile = ""

    async def start(self) -> NodeStarted:
        """Start this node's generator pool."""
        import ray

        self.pool, self.profile, _ = await asyncio.to_thread(
            self.stack.enter_context, target_pool(self.options, self.workload.api, self.fake_url, session_run_dir())
        )
        workers = self.pool.settings.profiles[self.profile].max_workers
        return NodeStarted(ray.util.get_node_ip_address(), os.getpid(), workers, self.options.worker_streams,
                           machine())  # fmt: skip

    async def calibrate(self) -> dict[str, Any]:
        """This node's generator ceiling at its share of the streams (against a fake of its own)."""
        return await asyncio.to_thread(calibrate, self.options)

    async def clock(self) -> tuple[int, int]:
        """This node's monotonic and wall clocks (ns), for the driver to align them with its own."""
        return time.monotonic_ns(), time.time_ns()

    async def run_point(self, number: int, load: dict[str, Any], share: Share) -> AsyncIterator[Batch | PointEnd]:
        """The node's share of a point: batches of records and samples as they come, then its `PointEnd`."""
        relay = _Relay()

        async def drive() -> Any:
            try:
                return await drive_point(self.pool, self.profile, self.workload, self.options, number, load,
                                         relay.record, relay, share)  # fmt: skip
            finally:
                relay.queue.put_nowait(None)

        task = asyncio.create_task(drive())
        async for batch in relay.batches():
            yield batch
        run = await task
        yield PointEnd(run.lags, run.cpu_cores)

    async def close(self) -> None:
        await asyncio.to_thread(self.stack.close)
