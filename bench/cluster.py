"""cluster: `isopool batch` of 2,000 lines on a local Ray cluster of one node and of three,
next to the local runner at the same concurrency; a node SIGKILLed mid-run (time until its
lines are answered elsewhere); idle memory of the cluster and of each node's pool.

Needs the `ray` extra, so `python -m bench all` leaves it out: `python -m bench cluster`.
Every node runs on this same machine, so three nodes share its cores with the fake
provider: the figures show what Ray costs, not a speed-up.

Targets: three nodes within 1.5x of the local runner's makespan at the same total
concurrency, once their pools are up (the start-up, which a local run with a running pool
does not pay, is shown apart); a lost node's lines answered elsewhere within 10 s of the kill."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from typing import Any

from broker import Pool
from broker.batch import RayOptions
from broker.batch import run as run_batch
from broker.batch.cluster import pinned_actor
from broker.batch.localcluster import LocalCluster
from broker.batch.node import NodePool
from broker.config import load_settings
from broker.fake_provider import FakeProviderProcess
from broker.fake_provider.server import Latency

from .common import pick, result, target, uss

PER_NODE = 16
MB = 2**20
LATENCY = Latency(ttft=0.05, gap=0.005, tokens=20)  # 150 ms a line, like a short real answer


def settings(url: str, workers: int) -> Any:
    profile = {"kind": "anthropic", "base_url": url, "min_workers": workers, "max_workers": workers,
               "spare_workers": 0}  # fmt: skip
    return load_settings(profiles={"anthropic": profile}, log_level="ERROR")


def write_input(path: str, n: int) -> str:
    with open(path, "w") as f:
        for i in range(n):
            params = {"model": "claude-bench", "max_tokens": 32, "messages": [{"role": "user", "content": f"q{i}"}]}
            f.write(json.dumps({"custom_id": f"q{i}", "params": params}) + "\n")
    return path


def local_row(fake: FakeProviderProcess, source: str, tmp: str, concurrency: int) -> dict[str, Any]:
    with Pool(settings(fake.url, concurrency)) as pool:
        summary = run_batch(source, f"{tmp}/local-{concurrency}.jsonl", pool=pool, concurrency=concurrency)
    return {"run": f"local runner, c={concurrency}", "nodes": 0, "in_flight": concurrency, "ok": summary.ok,
            "makespan_s": summary.wall_s, "startup_s": 0.0}  # fmt: skip


def ray_row(cluster: LocalCluster, fake: FakeProviderProcess, source: str, out: str, **hooks: Any) -> dict[str, Any]:
    """One `--ray` run; `startup_s` is until every node's pool is up and the first lines are dealt."""
    started = time.monotonic()
    begun: list[float] = []
    options = RayOptions(cluster.address, per_node_concurrency=PER_NODE, settings=settings(fake.url, PER_NODE))
    summary = run_batch(source, out, ray=options, on_start=lambda todo: begun.append(time.monotonic()), **hooks)
    nodes = len(cluster.nodes)
    return {"run": f"Ray, {nodes} node(s) x {PER_NODE}", "nodes": nodes, "in_flight": nodes * PER_NODE,
            "ok": summary.ok, "makespan_s": summary.wall_s, "startup_s": round(begun[0] - started, 2),
            "summary": summary}  # fmt: skip


def idle_memory(cluster: LocalCluster, fake: FakeProviderProcess) -> dict[str, Any]:
    """USS of every Ray process of the cluster, then of each node's pool (its actor included)
    with `PER_NODE` idle workers."""
    import msgspec
    import ray

    time.sleep(2.0)  # let the nodes settle after their start
    cluster_mb = uss(cluster.live_pids()) / MB
    ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        node_settings = msgspec.json.encode(settings(fake.url, PER_NODE))
        actors = [
            pinned_actor(ray, NodePool, node.node_id, node_settings, "anthropic", PER_NODE, 0, None)
            for node in cluster.nodes
        ]
        infos = ray.get([actor.start.remote() for actor in actors])
        time.sleep(1.0)
        nodes = zip(cluster.nodes, infos, strict=True)
        pools = [uss(cluster.pool_processes(node) | {info["pid"]}) / MB for node, info in nodes]
        ray.get([actor.close.remote() for actor in actors])
        for actor in actors:
            ray.kill(actor)
    finally:
        ray.shutdown()
    return {"cluster_idle_mb": round(cluster_mb, 1), "pool_idle_mb": [round(mb, 1) for mb in pools]}


def node_loss(cluster: LocalCluster, fake: FakeProviderProcess, source: str, tmp: str) -> dict[str, Any]:
    """SIGKILL the last node's Ray processes once every slot is busy; when its lines are done elsewhere."""
    import threading

    killed: dict[str, float] = {}

    def chaos() -> None:
        deadline = time.monotonic() + 120
        while fake.stats()["active"] < len(cluster.nodes) * PER_NODE * 0.8 and time.monotonic() < deadline:
            time.sleep(0.01)
        cluster.kill_node(cluster.nodes[-1])  # by pid: signals need no main thread
        killed["at"] = time.time()

    helper = threading.Thread(target=chaos, daemon=True)
    helper.start()
    row = ray_row(cluster, fake, source, f"{tmp}/loss.jsonl")
    helper.join()
    summary = row.pop("summary")
    lost = [n for n in summary.nodes.values() if n.lost]
    node = lost[0] if lost else None
    return {
        "ok": summary.ok,
        "makespan_s": summary.wall_s,
        "reexecuted": summary.reexecuted,
        "noticed_after_s": round(node.lost_at - killed["at"], 2) if node else None,
        "answered_elsewhere_after_s": round(node.lost_at + node.recovered_s - killed["at"], 2)
        if node and node.recovered_s is not None
        else None,
    }


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    items = pick(size, 2000, 600, 120)
    rows, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, FakeProviderProcess(LATENCY) as fake:
        source = write_input(f"{tmp}/in.jsonl", items)
        for concurrency in (PER_NODE, 3 * PER_NODE):
            rows.append(local_row(fake, source, tmp, concurrency))
        for nodes in (1, 3):
            with LocalCluster(nodes=nodes) as cluster:
                if nodes == 3:
                    figures["memory"] = idle_memory(cluster, fake)
                row = ray_row(cluster, fake, source, f"{tmp}/ray-{nodes}.jsonl")
                row.pop("summary")
                rows.append(row)
                if nodes == 3:
                    figures["node_loss"] = node_loss(cluster, fake, source, tmp)
    figures["rows"] = rows
    by_run = {r["run"]: r for r in rows}
    three, local = by_run[f"Ray, 3 node(s) x {PER_NODE}"], by_run[f"local runner, c={3 * PER_NODE}"]
    ratio = round((three["makespan_s"] - three["startup_s"]) / local["makespan_s"], 2)
    loss = figures["node_loss"]["answered_elsewhere_after_s"]
    targets = [
        target(
            "3 nodes' makespan after start-up / local runner's, same concurrency", ratio, "<= 1.5", lambda v: v <= 1.5
        ),  # fmt: skip
        target("a lost node's lines answered elsewhere after the kill (s)", loss, "<= 10", lambda v: v <= 10),
    ]
    inputs = {"items": items, "per_node_concurrency": PER_NODE, "latency": "ttft 50 ms + 20 x 5 ms"}
    return result(inputs, figures, targets, started)


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["run", "lines in flight", "ok", "makespan s", "of which start-up s"]
    rows = [[r["run"], r["in_flight"], r["ok"], r["makespan_s"], r["startup_s"]] for r in data["figures"]["rows"]]
    loss, memory = data["figures"]["node_loss"], data["figures"]["memory"]
    rows.append([f"Ray, 3 nodes, one SIGKILLed (noticed {loss['noticed_after_s']} s, lines answered elsewhere "
                 f"{loss['answered_elsewhere_after_s']} s after the kill, {loss['reexecuted']} run again)",
                 3 * PER_NODE, loss["ok"], loss["makespan_s"], None])  # fmt: skip
    rows.append([f"idle memory: cluster {memory['cluster_idle_mb']} MB, each node's pool {memory['pool_idle_mb']} MB",
                 None, None, None, None])  # fmt: skip
    return head, rows
