"""A batch on a Ray cluster: one pool actor per node, the driver as the single writer.

The driver places one `NodePool` actor on every alive node (hard node affinity; nodes
that join later get one too) and deals it items in small chunks, never more in flight
than the node's limit. Results come back one by one and only the driver writes them to
the ledger, so the output is the same as a local run's and a killed driver resumes
with the same command. When an actor or its node dies, its unanswered items go back to
the front of the queue for the others; each of them may already have reached the
provider, so every one dealt again is counted (`reexecuted`): they may be paid twice.

Ray never retries on its own here (no actor restarts, no task retries): which item
runs again is decided here, and stalls and retries stay inside each node's broker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from ..config import Settings, load_settings
from .execute import Counters
from .formats import Item, is_ok
from .ledger import Ledger, OutputWriteFailed
from .node import NodePool

INSTALL_HINT = "pip install 'isopool[ray]'"
log = logging.getLogger(__name__)

CHUNK = 4  # items per deal: small, so a lost node takes few with it and slow items do not queue behind others
NODE_START_TIMEOUT = 120.0  # a node's pool: its broker, zygote and first workers
NO_NODE_TIMEOUT = 60.0  # how long a run waits for a node to join when every node is gone
WATCH_INTERVAL = 1.0


class RayUnavailable(RuntimeError):
    """Ray is not installed, or no cluster answers at the address; the message says what to do."""


class RayOptions(msgspec.Struct, frozen=True):
    """Where and how a batch runs on Ray."""

    address: str = "auto"  # as `ray.init` takes it: "auto" is $RAY_ADDRESS or the cluster started on this machine
    per_node_concurrency: int | None = None  # requests in flight per node (default: what its pool's workers carry)
    metrics_port: int | None = None  # each node's pool serves Prometheus metrics on NODE_IP:PORT (0: any free port)
    settings: Settings | None = None  # each node's pool (default: this machine's settings, file and environment)
    chunk: int = CHUNK


class NodeStats(msgspec.Struct):
    """One node's share of the run, as the summary shows it."""

    ip: str = ""
    done: int = 0
    ok: int = 0
    failed: int = 0
    stalls_recovered: int = 0
    retries: int = 0
    lost: bool = False
    error: str = ""  # why the node's pool did not start or was lost
    lost_at: float = 0.0  # when the driver noticed (seconds since the epoch)
    recovered_s: float | None = None  # from its loss to the last of its items answered elsewhere
    metrics_url: str = ""


def require_ray() -> Any:
    """The `ray` module, or a RayUnavailable that says how to install it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def sized(settings: Settings, per_node: int | None) -> Settings:
    """Each profile with enough workers to carry `per_node` requests at once."""
    if not per_node:
        return settings
    profiles = {}
    for name, profile in settings.profiles.items():
        most = max(1, math.ceil(per_node / profile.concurrency))
        profiles[name] = msgspec.structs.replace(
            profile, max_workers=most, min_workers=min(profile.min_workers, most),
            spare_workers=min(profile.spare_workers, most),
        )  # fmt: skip
    return msgspec.structs.replace(settings, profiles=profiles)


class Node:
    """The driver's view of one node: its actor, what it holds, what it did."""

    def __init__(self, node_id: str, actor: Any) -> None:
        self.node_id, self.actor = node_id, actor
        self.limit = 0  # 0 until its pool has started
        self.in_flight: dict[str, Item] = {}
        self.stats = NodeStats()
        self.counters: Counters | None = None  # the last its pool reported
        self.orphans: set[str] = set()  # its items re-dealt after its loss, not yet answered

    @property
    def name(self) -> str:
        return f"{self.stats.ip or '?'} {self.node_id[:8]}"

    @property
    def usable(self) -> bool:
        return self.limit > 0 and not self.stats.lost


class Dealer:
    """Deals the items to the nodes' actors and writes each first answer to the ledger."""

    def __init__(
        self, ray: Any, options: RayOptions, items: list[Item], ledger: Ledger, retry_budget: int,
        on_result: Callable[[dict[str, Any]], None], on_start: Callable[[int], None],
        on_status: Callable[[dict[str, Any]], None],
    ) -> None:  # fmt: skip
        self.ray, self.options, self.ledger, self.retry_budget = ray, options, ledger, retry_budget
        self.queue: collections.deque[Item] = collections.deque(items)
        self.todo = len(items)
        self.remaining = len(items)
        self.kind = items[0].kind
        settings = options.settings or load_settings()
        self.settings_json = msgspec.json.encode(sized(settings, options.per_node_concurrency))
        self.on_result, self.on_start, self.on_status = on_result, on_start, on_status
        self.nodes: dict[str, Node] = {}
        self.maybe_ran: set[str] = set()  # in flight on a lost node: may have reached the provider
        self.reexecuted = 0
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.fatal: BaseException | None = None

    async def run(self) -> Counters:
        """Deal every item; returns the counters for the summary."""
        try:
            await self._discover(wait=True)
            if not any(node.usable for node in self.nodes.values()):
                errors = "; ".join(f"{n.name}: {n.stats.error}" for n in self.nodes.values()) or "no alive node"
                raise RayUnavailable(
                    f"no node of the Ray cluster could start a pool ({errors}); is isopool installed on every "
                    "node, in the same Python version as here?"
                )
            self.on_start(self.todo)
            watcher = self._spawn(self._watch())
            while self.remaining and self.fatal is None:
                self._deal()
                await self.wake.wait()
                self.wake.clear()
            watcher.cancel()
            if self.fatal is not None:
                raise self.fatal
            await self._poll_stats()
        finally:
            await self._close()
        return self._counters()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _discover(self, wait: bool = False) -> None:
        """Start an actor on every alive node that has none (`wait`: until their pools are up);
        a node that is no longer alive is lost."""
        alive = {n["NodeID"] for n in await asyncio.to_thread(self.ray.nodes) if n["Alive"]}
        for node_id, node in list(self.nodes.items()):
            if node_id not in alive:
                self._lose(node, "the node is no longer alive")
        joins = [self._join(node_id) for node_id in alive - self.nodes.keys()]
        if wait:
            await asyncio.gather(*joins)
        else:
            for join in joins:
                self._spawn(join)

    async def _join(self, node_id: str) -> None:
        args = (self.settings_json, self.kind, self.options.per_node_concurrency, self.retry_budget,
                self.options.metrics_port)  # fmt: skip
        node = self.nodes[node_id] = Node(node_id, pinned_actor(self.ray, NodePool, node_id, *args))
        try:
            info = await node_started(node.actor.start.remote())
        except Exception as exc:  # the node's pool did not start (or the node died): leave the node out
            node.stats.lost, node.stats.error = True, short_error(exc)
            self.ray.kill(node.actor)
            log.warning("node %s left out: its pool did not start (%s)", node.node_id[:8], node.stats.error)
            return
        node.stats.ip, node.stats.metrics_url, node.limit = info["ip"], info["metrics_url"], info["limit"]
        self.wake.set()

    def _deal(self) -> None:
        """Give each usable node chunks of items up to its limit; items answered meanwhile are skipped."""
        for node in self.nodes.values():
            while node.usable and self.queue and len(node.in_flight) < node.limit:
                take = min(self.options.chunk, node.limit - len(node.in_flight))
                chunk: list[Item] = []
                while self.queue and len(chunk) < take:
                    item = self.queue.popleft()
                    if item.custom_id in self.ledger.done:
                        continue
                    if item.custom_id in self.maybe_ran:
                        self.maybe_ran.discard(item.custom_id)
                        self.reexecuted += 1
                    chunk.append(item)
                    node.in_flight[item.custom_id] = item
                if chunk:
                    self._spawn(self._stream(node, chunk))

    async def _stream(self, node: Node, chunk: list[Item]) -> None:
        try:
            async for ref in node.actor.run.remote(chunk):
                self._record(node, await ref)
        except (self.ray.exceptions.RayTaskError, OutputWriteFailed) as exc:  # a bug, or a full disk: stop the run
            self.fatal = exc
        except self.ray.exceptions.RayError as exc:  # the actor or its node died (or is unreachable)
            self._lose(node, short_error(exc))
        self.wake.set()

    def _record(self, node: Node, record: dict[str, Any]) -> None:
        custom_id = record["custom_id"]
        node.in_flight.pop(custom_id, None)
        if custom_id in self.ledger.done:  # a late answer of a node declared lost: the first one stands
            return
        self.ledger.write(record)
        self.remaining -= 1
        node.stats.done += 1
        if is_ok(record):
            node.stats.ok += 1
        else:
            node.stats.failed += 1
        self.on_result(record)
        for lost in self.nodes.values():
            if custom_id in lost.orphans:
                lost.orphans.discard(custom_id)
                if not lost.orphans:
                    lost.stats.recovered_s = round(time.time() - lost.stats.lost_at, 3)
        self.wake.set()

    def _lose(self, node: Node, reason: str) -> None:
        """Put the node's unanswered items back at the front of the queue; never deal it again."""
        if node.stats.lost:
            return
        node.stats.lost, node.stats.error, node.stats.lost_at = True, reason, time.time()
        orphans = list(node.in_flight.values())
        node.in_flight.clear()
        node.orphans = {item.custom_id for item in orphans}
        if not orphans:
            node.stats.recovered_s = 0.0
        self.maybe_ran.update(node.orphans)
        self.queue.extendleft(reversed(orphans))
        self.ray.kill(node.actor)  # an unreachable actor that is still alive must not go on with them
        log.warning("node %s lost (%s): %d item(s) dealt again", node.name, reason, len(orphans))
        self.wake.set()

    async def _watch(self) -> None:
        """Once a second: give new nodes an actor, notice dead ones, refresh the nodes' stats."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            await self._discover()
            await self._poll_stats()
            if not any(node.usable for node in self.nodes.values()) and self._waited_for_nodes():
                self.fatal = RayUnavailable(
                    f"every node of the Ray cluster is gone and none joined for {NO_NODE_TIMEOUT:g}s; "
                    "the results so far are written, run the same command again to go on"
                )
                self.wake.set()
                return
            self.on_status(self._status())

    def _waited_for_nodes(self) -> bool:
        last_loss = max((n.stats.lost_at for n in self.nodes.values()), default=0.0)
        return time.time() - last_loss > NO_NODE_TIMEOUT

    async def _poll_stats(self) -> None:
        async def poll(node: Node) -> None:
            try:
                node.counters = await asyncio.wait_for(node.actor.stats.remote(), 10.0)
            except Exception:  # noqa: BLE001 - a dying node keeps its last counters; its stream reports the loss
                return
            node.stats.stalls_recovered = node.counters.stalls
            node.stats.retries = node.counters.retries

        await asyncio.gather(*(poll(node) for node in self.nodes.values() if node.usable))

    def _status(self) -> dict[str, Any]:
        nodes = self.nodes.values()
        return {
            "concurrency": sum(len(n.in_flight) for n in nodes),
            "resent": sum(n.counters.batch_retries for n in nodes if n.counters),
            "stalls": sum(n.stats.stalls_recovered for n in nodes),
            "nodes": {n.name: msgspec.structs.asdict(n.stats) for n in nodes},
        }

    def _counters(self) -> Counters:
        return Counters.total([n.counters for n in self.nodes.values() if n.counters])

    async def _close(self) -> None:
        """Stop every node's pool (it would stop with its actor too), then the actors."""
        for task in list(self.tasks):
            task.cancel()

        async def close(node: Node) -> None:
            try:
                await asyncio.wait_for(node.actor.close.remote(), 15.0)
            except Exception:  # noqa: BLE001 - killed below either way; its broker exits with the actor
                pass
            self.ray.kill(node.actor)

        await asyncio.gather(*(close(node) for node in self.nodes.values() if not node.stats.lost))


def pinned_actor(ray: Any, cls: type, node_id: str, *args: Any) -> Any:
    """An actor of `cls` pinned to the node (`args`: its constructor's)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return (
        ray.remote(cls)
        .options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            num_cpus=0,  # the pool's processes wait on the network; they take no CPU slot from the node's tasks
            max_restarts=0,
            max_task_retries=0,  # never re-run by Ray: the driver decides what runs again
        )  # fmt: skip
        .remote(*args)
    )


async def node_started(start: Any) -> Any:
    """A node actor's `start()`, waited for at most NODE_START_TIMEOUT: a timeout says so (asyncio's is blank)."""
    try:
        return await asyncio.wait_for(start, NODE_START_TIMEOUT)
    except TimeoutError:
        raise TimeoutError(f"no answer within {NODE_START_TIMEOUT:g} s (is the node overloaded?)") from None


def short_error(exc: BaseException) -> str:
    """The error's type and its cause's last line (Ray's messages carry the actor's whole traceback)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}"[:300]


def run_on_ray(options: RayOptions, items: list[Item], ledger: Ledger, retry_budget: int,
               on_result: Callable[[dict[str, Any]], None], on_start: Callable[[int], None],
               on_status: Callable[[dict[str, Any]], None]) -> tuple[Counters, dict[str, NodeStats], int]:  # fmt: skip
    """Connect to the cluster (unless this process already is), deal the items, disconnect. Returns
    the run's counters, each node's share, and how many items were dealt again after a node was lost."""
    with connected(options.address) as ray:
        dealer = Dealer(ray, options, items, ledger, retry_budget, on_result, on_start, on_status)
        counters = asyncio.run(dealer.run())
    return counters, {n.name: n.stats for n in dealer.nodes.values()}, dealer.reexecuted


@contextlib.contextmanager
def connected(address: str) -> Iterator[Any]:
    """The `ray` module, connected to the cluster at `address` (unless this process already is) until the end."""
    ray = require_ray()
    ours = not ray.is_initialized()
    if ours:
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise RayUnavailable(
                f"no Ray cluster answered at {address!r} ({exc}); start one with `ray start --head` "
                "or pass its address (--ray HOST:6379)"
            ) from None
    try:
        yield ray
    finally:
        if ours:
            ray.shutdown()
