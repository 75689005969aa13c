"""A Ray cluster of several nodes on this one machine: for trying `--ray`, the tests and the bench.

Built on `ray.cluster_utils.Cluster` (one GCS, one raylet per node). Every process it
starts is recorded by pid and ended by pid at `shutdown`, never by name, so other Ray
instances on the machine are left alone. Health checks are shortened so that a dead node
is noticed within about two seconds (Ray's defaults take half a minute or more).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from typing import Any

import psutil

HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class LocalCluster:
    """`nodes` Ray nodes of `cpus` CPUs each. With `loopback`, every node and every driver
    started from this process's environment uses 127.0.0.1 (Ray otherwise turns 127.0.0.1 in
    an address into the machine's own address, which a loopback-bound cluster does not answer)."""

    def __init__(self, nodes: int = 3, cpus: int = 1, loopback: bool = False) -> None:
        from ray.cluster_utils import Cluster

        self.loopback, self.cpus = loopback, cpus
        if loopback:
            from ray._private import ray_constants

            self._was = os.environ.get(LOCAL_ONLY), ray_constants.ENABLE_RAY_CLUSTER
            os.environ[LOCAL_ONLY] = "0"  # "no cluster beyond this machine": loopback addresses
            ray_constants.ENABLE_RAY_CLUSTER = False
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit
        head: dict[str, Any] = {"num_cpus": cpus, "temp_dir": self.temp_dir, "_system_config": HEALTH_CHECKS}
        if loopback:
            head["node_ip_address"] = "127.0.0.1"
        self.pids: set[int] = set()
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.nodes = [self.cluster.head_node]
        self._record(self.cluster.head_node)
        for _ in range(nodes - 1):
            self.add_node()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self) -> Any:
        """One more node (from the main thread: Ray installs signal handlers)."""
        node = self.cluster.add_node(num_cpus=self.cpus, **({"node_ip_address": "127.0.0.1"} if self.loopback else {}))
        self.nodes.append(node)
        self._record(node)
        return node

    def _record(self, node: Any) -> None:
        for infos in node.all_processes.values():
            self.pids.update(info.process.pid for info in infos)

    @staticmethod
    def raylet(node: Any) -> psutil.Process:
        return psutil.Process(node.all_processes["raylet"][0].process.pid)

    def pool_processes(self, node: Any) -> set[int]:
        """The isopool processes of a node: those below its Ray worker processes (broker, zygote, workers)."""
        found = {p.pid for w in self.raylet(node).children() for p in w.children(recursive=True)}
        self.pids |= found
        return found

    def kill_node(self, node: Any) -> set[int]:
        """SIGKILL the node's Ray processes (its raylet and the raylet's workers), as a machine
        that dies takes them; returns its isopool processes, which must then end by themselves."""
        raylet = self.raylet(node)
        ray_processes = [raylet, *raylet.children()]
        pool = self.pool_processes(node)
        self.pids |= {p.pid for p in ray_processes}
        for proc in ray_processes:
            os.kill(proc.pid, signal.SIGKILL)
        return pool

    def live_pids(self) -> set[int]:
        """Every process of the cluster now (recorded from here on): its head processes, and each
        node's raylet with everything below it."""
        for node in self.nodes:
            try:
                self.pids |= {self.raylet(node).pid, *(p.pid for p in self.raylet(node).children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        return {pid for pid in self.pids if alive(pid)}

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop the cluster, then SIGKILL by pid whatever it left; remove its temp dir."""
        self.live_pids()
        self.cluster.shutdown()
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(alive(pid) for pid in self.pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.loopback:
            from ray._private import ray_constants

            env, ray_constants.ENABLE_RAY_CLUSTER = self._was
            if env is None:
                os.environ.pop(LOCAL_ONLY, None)
            else:
                os.environ[LOCAL_ONLY] = env

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def alive(pid: int) -> bool:
    """Running (a zombie has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
