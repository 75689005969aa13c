"""`isopool loadtest --ray`: a load test from every node of a Ray cluster, one timeline.

One `NodeGenerator` actor per alive node (pinned to it, as `isopool batch --ray` places its
pools) runs a generator pool there; the built-in fake, when it is the target, runs once, here,
on an address every node reaches. Each point is split among the nodes (`Share`): a closed loop's
streams and requests as evenly as they go; an open loop's arrivals are one schedule, drawn from
the run's seed as on one machine, dealt to the nodes in turn. That keeps the offered load the
single-machine run's, arrival for arrival (independent per-node Poisson streams would add up to
a Poisson stream too, but a constant rate would turn into bursts of N, and the two runs would
not send the same schedule); each node's caps are its part of the point's.

Clocks: every node times its requests with its own monotonic clock. Before each point the driver
aligns each node's clock with its own (`clock.align`: the quickest of a few round trips, error
at most half of it) and gives every node the same start, in the node's own clock; a node's
records count from that start, so all of them are on the driver's timeline, each node's within
its alignment error. After the point the clocks are read again; how far the offset moved (drift)
is reported next to the error, per node, in results.json and the summary.

Records are streamed back while the point runs and written to records.jsonl as they arrive, each
with its `node`; a killed run keeps what ended. Each point's figures are those of all the records
merged, and per node the same figures over its own records, with its generator's verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from typing import Any

import msgspec

from ..batch.cluster import RayUnavailable, connected, node_started, pinned_actor, require_ray, short_error
from .clock import Alignment, align
from .node import Batch, NodeGenerator, NodeStarted
from .options import Options, Workload
from .runner import (
    PointRun,
    Progress,
    begin_point,
    compare_with_ceiling,
    fake_provider,
    results_header,
    write_json,
    write_records,
)
from .schedule import Share
from .summary import parse_slo, point_result, steady_window

LEAD = 0.5  # seconds from the start's announcement to the start: every node has heard of it by then
CLOSE_TIMEOUT = 15.0
KEPT_UP = "the generator kept up"


class _Node:
    """The driver's view of one node: its actor, its clock, what it measured."""

    def __init__(self, node_id: str, ip: str, actor: Any) -> None:
        self.node_id, self.actor = node_id, actor
        self.name = f"{ip} {node_id[:8]}"
        self.started: NodeStarted | None = None
        self.calibration: dict[str, Any] = {}
        self.clock = Alignment(0, 0.0, 0.0, 0.0)
        self.latest: dict[str, Any] = {}  # its last sample, for the live display


def run_on_ray(options: Options, out_dir: str, progress: Progress) -> dict[str, Any]:
    """`runner.run` with a generator pool on every node of the cluster at `options.ray`."""
    require_ray()  # before anything is written
    workload = options.workload()
    with connected(options.ray) as ray:
        return asyncio.run(_Driver(ray, options, workload, out_dir, progress).run())


class _Driver:
    def __init__(self, ray: Any, options: Options, workload: Workload, out_dir: str, progress: Progress) -> None:
        self.ray, self.options, self.workload, self.out_dir, self.progress = ray, options, workload, out_dir, progress
        self.nodes: list[_Node] = []
        self.slo = parse_slo(options.slo)

    async def run(self) -> dict[str, Any]:
        os.makedirs(self.out_dir, exist_ok=True)
        results = results_header(self.options, self.workload.api)
        with contextlib.ExitStack() as stack:
            fake = None
            if self.options.target == "fake":  # one target for all the nodes, on an address they reach
                fake = stack.enter_context(fake_provider(self.options, self.ray.util.get_node_ip_address()))
            try:
                results["ray"] = await self._start(fake.url if fake else "")
                results["pool"] = {"workers": sum(n.started.workers for n in self.nodes if n.started)}
                if self.options.calibrate:
                    results["calibration"] = await self._calibrate()
                write_json(os.path.join(self.out_dir, "results.json"), results)
                with open(os.path.join(self.out_dir, "records.jsonl"), "wb") as sink:
                    for number, load in enumerate(self.options.points):
                        results["points"].append(await self._point(number, load, sink, results.get("calibration")))
                        if fake is not None:
                            results["fake_provider"] = await asyncio.to_thread(fake.stats)
                        write_json(os.path.join(self.out_dir, "results.json"), results)
            finally:
                await self._close()
        return results

    async def _start(self, fake_url: str) -> dict[str, Any]:
        """An actor with a generator pool on every alive node; a node whose pool does not start is left out."""
        alive = sorted((n["NodeID"], n["NodeManagerAddress"]) for n in await asyncio.to_thread(self.ray.nodes)
                       if n["Alive"])  # fmt: skip
        for number, (node_id, ip) in enumerate(alive):
            options = _node_options(self.options, Share(number, len(alive)))
            workload = msgspec.structs.replace(self.options, seed=self.options.seed + 1_000_003 * number).workload()
            actor = pinned_actor(self.ray, NodeGenerator, node_id, msgspec.json.encode(options), workload, fake_url)
            self.nodes.append(_Node(node_id, ip, actor))
        outcomes = await asyncio.gather(
            *(node_started(n.actor.start.remote()) for n in self.nodes), return_exceptions=True
        )
        left_out = {}
        for node, outcome in zip(list(self.nodes), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                left_out[node.name] = short_error(outcome)
                self.ray.kill(node.actor)
                self.nodes.remove(node)
                self.progress.note(f"node {node.name} left out: its generator did not start ({left_out[node.name]})")
            else:
                node.started = outcome
        if not self.nodes:
            why = "; ".join(f"{name}: {error}" for name, error in left_out.items()) or "no node is alive"
            raise RayUnavailable(f"no node of the Ray cluster could start a load generator ({why}); is isopool "
                                 "installed on every node, in the same Python version as here?")  # fmt: skip
        return {
            "address": self.options.ray,
            "nodes": {n.name: {"node_id": n.node_id, **msgspec.to_builtins(n.started)} for n in self.nodes},
            "left_out": left_out,
        }

    async def _calibrate(self) -> dict[str, Any]:
        """Every node's generator ceiling at its share of the streams, measured at the same time (nodes that
        share a machine share its CPU, as they do in the run); the cluster's is their sum."""
        found = await asyncio.gather(*(n.actor.calibrate.remote() for n in self.nodes))
        for node, calibration in zip(self.nodes, found, strict=True):
            node.calibration = calibration
        keys = ("chunks_per_s", "requests_per_s", "in_flight_mean", "cpu_cores_mean")
        total = {key: round(sum(c[key] for c in found), 3) for key in keys}
        self.progress.note(
            f"generator ceiling of the {len(found)} nodes together: {total['chunks_per_s']:,.0f} chunks/s, "
            f"{total['requests_per_s']:,.1f} requests/s at {self.options.capacity} streams (each node against a "
            "built-in fake of its own, which shares its CPU: a lower bound)"
        )
        return {"concurrency": self.options.capacity, **total,
                "nodes": {n.name: n.calibration for n in self.nodes}}  # fmt: skip

    async def _point(self, number: int, load: dict[str, Any], sink: Any, calibration: dict | None) -> dict[str, Any]:
        """Align the clocks, start every node's share at once, write the records as they come, merge."""
        begin_point(self.progress, self.options, load)
        taking = self.nodes[: _participants(load, self.options.requests_per_point, len(self.nodes))]
        for node in taking:  # one after another: round trips that overlap would be longer
            node.clock = await align(node.actor)
        start = time.monotonic_ns() + int(LEAD * 1e9)
        shares = [Share(k, len(taking), node.clock.to_node(start)) for k, node in enumerate(taking)]
        try:
            streams = (
                self._stream(node, number, load, share, sink) for node, share in zip(taking, shares, strict=True)
            )
            runs = await asyncio.gather(*streams)
        except self.ray.exceptions.RayTaskError:  # a bug in the node's generator: its traceback says where
            raise
        except self.ray.exceptions.RayError as exc:  # the actor or its node died, or cannot be reached
            raise RayUnavailable(
                f"a node was lost during point {number} ({short_error(exc)}); the records so far are in "
                f"{self.out_dir}/records.jsonl: `isopool loadtest report {self.out_dir}`"
            ) from None
        drifts = [(await align(node.actor)).offset_ns - node.clock.offset_ns for node in taking]
        return self._merge(load, list(zip(taking, shares, runs, drifts, strict=True)), calibration)

    def _merge(self, load: dict[str, Any], parts: list[tuple[_Node, Share, PointRun, int]],
               calibration: dict | None) -> dict[str, Any]:  # fmt: skip
        """The point's figures over every node's records, and each node's over its own."""
        runs = [run for _, _, run, _ in parts]
        records = [r for run in runs for r in run.records]
        window = steady_window(records, self.options.warmup, self.options.duration)
        samples = [_combine([s for s in row if s]) for row in itertools.zip_longest(*(run.samples for run in runs))]
        lags = [lag for run in runs for lag in run.lags]
        point = point_result(load, records, samples, lags, self.slo, sum(run.cpu_cores for run in runs), window)
        point["nodes"] = {}
        for node, share, run, drift in parts:
            mine = _node_figures(share, load, run, self.slo, window)
            if calibration:
                compare_with_ceiling(mine, node.calibration)
            point["nodes"][node.name] = mine | {"alignment": node.clock.report(drift)}
        if calibration:
            compare_with_ceiling(point, calibration)
        point["generator"]["verdict"] = point_verdict(point["generator"]["verdict"], point["nodes"])
        return point

    async def _stream(self, node: _Node, number: int, load: dict[str, Any], share: Share, sink: Any) -> PointRun:
        """One node's share of the point: its records written as they come, its samples shown."""
        records: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        run = PointRun(records, samples, [], 0.0)
        async for ref in node.actor.run_point.remote(number, load, share):
            item = await ref
            if not isinstance(item, Batch):  # the PointEnd
                run = PointRun(records, samples, item.lags, item.cpu_cores)
                continue
            for record in item.records:
                record["node"] = node.name
            write_records(sink, item.records, self.progress)
            records.extend(item.records)
            samples.extend(item.samples)
            if item.samples:
                node.latest = item.samples[-1]
                self.progress.sample(_combine([n.latest for n in self.nodes if n.latest]))
        return run

    async def _close(self) -> None:
        """Stop every node's generator pool (it would stop with its actor too), then the actors."""

        async def close(node: _Node) -> None:
            with contextlib.suppress(Exception):  # killed below either way; its pool goes with it
                await asyncio.wait_for(node.actor.close.remote(), CLOSE_TIMEOUT)
            self.ray.kill(node.actor)

        await asyncio.gather(*(close(node) for node in self.nodes))


def _node_figures(
    share: Share, load: dict[str, Any], run: PointRun, slo: dict[str, float], window: tuple[float, float]
) -> dict[str, Any]:
    """A node's share of a point and its figures over its own records, in the point's steady window."""
    mine = point_result(share.load(load), run.records, run.samples, run.lags, slo, run.cpu_cores, window)
    return {"load": mine["load"], "summary": mine["summary"], "generator": mine["generator"]}


def rebuilt_nodes(
    results: dict[str, Any], load: dict[str, Any], records: list[dict[str, Any]], window: tuple[float, float]
) -> dict[str, Any]:
    """Each node's figures of a point from the records alone (`isopool loadtest report`): the nodes in the
    order the run gave them their shares; no generator samples or clocks, which only the live run had."""
    options = results["options"]
    names = list(results["ray"]["nodes"])
    requests = options["requests"] or (0 if options["duration"] else 100)
    taking = names[: _participants(load, requests, len(names))]
    slo = parse_slo(options["slo"])
    nodes = {}
    for number, name in enumerate(taking):
        mine = [r for r in records if r.get("node") == name]
        nodes[name] = _node_figures(Share(number, len(taking)), load, PointRun(mine, [], [], None), slo, window)
    return nodes


def _node_options(options: Options, share: Share) -> Options:
    """A node's options: sized for its share of the streams (its pool and its calibration), and never
    `--ray` again; the points and their loads come from the driver."""
    streams = max(1, share.part(options.capacity))
    return msgspec.structs.replace(options, concurrency=[streams], rate=[], max_concurrency=0, ray="")


def _participants(load: dict[str, Any], requests: int, nodes: int) -> int:
    """How many nodes share a point: all of them, unless it has fewer streams, a lower cap or fewer
    requests than there are nodes (each node that takes part gets at least one)."""
    limits = (load.get("concurrency"), load.get("max_concurrency"), requests)
    return min(nodes, *(limit for limit in limits if limit))


def _combine(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The generators' samples of one second, as one generator's: CPU, reads and streams added up,
    the worst loop lag."""
    return {
        "cpu_cores": round(sum(s["cpu_cores"] for s in samples), 3),
        "loop_lag_max": max(s["loop_lag_max"] for s in samples),
        "ticks_per_s": round(sum(s["ticks_per_s"] for s in samples), 1),
        "in_flight": sum(s["in_flight"] for s in samples),
    }


def point_verdict(overall: str, nodes: dict[str, dict[str, Any]]) -> str:
    """The point's verdict, naming the nodes whose generator was the limit."""
    limited = {name: n["generator"]["verdict"] for name, n in nodes.items() if n["generator"]["verdict"] != KEPT_UP}
    if not limited:
        return overall
    where = "; ".join(f"{name}: {verdict.removeprefix('the generator was the limit: ')}"
                      for name, verdict in limited.items())  # fmt: skip
    said = f"the generator was the limit on {len(limited)} of {len(nodes)} nodes ({where})"
    return said if overall == KEPT_UP else f"{overall}; {said}"
