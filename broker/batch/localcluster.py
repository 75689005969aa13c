"""A Ray cluster of several nodes on this one machine: for trying `--ray`, the tests and the bench.

Built on `ray.cluster_utils.Cluster` (one GCS, one raylet per node). Every process it
starts is recorded by pid and ended by pid at `shutdown` (or as soon as a start fails or is
interrupted), never by name, so other Ray instances on the machine are left alone. Health
checks are shortened so that a dead node is noticed within about two seconds (Ray's defaults
take half a minute or more).
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
# Ray's constants while a cluster runs. Each node's start installs Ray's SIGTERM handler, which first
# drains the node for up to 30 s (for Ray Serve under Kubernetes): a local cluster has nothing to drain.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": 0.0}
LOOPBACK = {"ENABLE_RAY_CLUSTER": False}  # "no cluster beyond this machine": loopback addresses


class LocalCluster:
    """`nodes` Ray nodes of `cpus` CPUs each. With `loopback`, every node and every driver
    started from this process's environment uses 127.0.0.1 (Ray otherwise turns 127.0.0.1 in
    an address into the machine's own address, which a loopback-bound cluster does not answer)."""

    def __init__(self, nodes: int = 3, cpus: int = 1, loopback: bool = False) -> None:
        from ray.cluster_utils import Cluster

        create_ray_address_dir()
        self.loopback, self.cpus = loopback, cpus
        self._was = os.environ.get(LOCAL_ONLY), set_ray_constants(NO_DRAIN | (LOOPBACK if loopback else {}))
        if loopback:
            os.environ[LOCAL_ONLY] = "0"
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit
        self.pids: set[int] = set()
        self.nodes: list[Any] = []
        self.cluster = Cluster()  # the head is added below, so that a start that fails is shut down too
        try:
            # no dashboard: nothing here reads it, and its process is one more interpreter starting on each run
            self.add_node(temp_dir=self.temp_dir, include_dashboard=False, _system_config=HEALTH_CHECKS)
            for _ in range(nodes - 1):
                self.add_node()
        except BaseException:
            self.shutdown()
            raise

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, **args: Any) -> Any:
        """One more node (from the main thread: Ray installs signal handlers); the first is the head."""
        args = {"num_cpus": self.cpus, **({"node_ip_address": "127.0.0.1"} if self.loopback else {}), **args}
        node = self.cluster.add_node(**args)
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
        for node in {self.cluster.head_node, *self.cluster.worker_nodes} - {None}:
            self._record(node)  # with a node whose start failed half-way, which Ray holds and we never got
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
        env, constants = self._was
        set_ray_constants(constants)
        if self.loopback:
            if env is None:
                os.environ.pop(LOCAL_ONLY, None)
            else:
                os.environ[LOCAL_ONLY] = env

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def set_ray_constants(values: dict[str, Any]) -> dict[str, Any]:
    """Set those of Ray's constants this Ray has (read when used); returns their values before."""
    from ray._private import ray_constants

    was = {name: getattr(ray_constants, name) for name in values if hasattr(ray_constants, name)}
    for name in was:
        setattr(ray_constants, name, values[name])
    return was


def create_ray_address_dir() -> None:
    """Create Ray's default temp dir (/tmp/ray; $RAY_TMPDIR/ray or $TMPDIR/ray if set) as Ray does, shared.

    `Cluster` writes the head's address there, to `ray_current_cluster`, whatever `temp_dir` it
    is given: that file is how `ray.init(address="auto")` (`--ray auto`) in another process
    finds the cluster (ray-project/ray#16458). Ray creates the dir only for a node that uses it
    as its own temp dir, so on a new machine the write fails with FileNotFoundError. It is made
    0777 as Ray makes it (`try_make_directory_shared`), so that another user's `ray start` can
    still use it."""
    from ray._private.utils import get_ray_address_file

    directory = os.path.dirname(get_ray_address_file(None))
    try:
        os.makedirs(directory)
    except FileExistsError:
        return
    os.chmod(directory, 0o777)


def alive(pid: int) -> bool:
    """Running (a zombie has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
