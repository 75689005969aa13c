"""The broker's workers and the zygote that forks them: spawn, reconcile, retire, kill, reap.

The fleet owns every worker record and the zygote; it knows requests only as what a
worker carries. A killed worker's requests go back to the request flow through
`requeue`, and a profile whose workers keep failing at start has its queue failed
through `fail_queue`: the flow decides what each request becomes.
"""

from __future__ import annotations

import collections
import hmac
import logging
from collections.abc import Callable, Mapping

import psutil
import zmq

from worker import stacks
from worker.pipe import Spawned, WorkerSpec, ZygoteReady

from ..config import ZYGOTE_BOOT_TIMEOUT, Settings
from ..processes import kill_group, kill_tree
from ..protocol import PROTOCOL_VERSION, Heartbeat, Ready
from ..routes import groups
from .state import Reason, Request, Worker, WorkerState
from .stats import Stats
from .watchdog import Alarm, worker_due
from .zygote import Zygote

log = logging.getLogger(__name__)

# How long the replacement of a worker killed with requests waits to be forked while none of its group's
# requests is left waiting: the fork and the new worker's start (~10 ms of CPU) would compete with the
# retries' first steps on a free worker, on a machine with few cores.
RETRY_FIRST = 0.05


class Fleet:
    def __init__(
        self,
        settings: Settings,
        stats: Stats,
        alarm: Alarm,
        zygote: Zygote,
        backend_url: str,
        death_fd: int,
        requeue: Callable[[Request, Reason, float], None],
        fail_queue: Callable[[str, str], None],
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.alarm = alarm
        self.zygote = zygote
        self.zygote_generation = 0
        self.backend_url = backend_url
        self.death_fd = death_fd  # workers exit when the broker's end of it closes
        self.requeue = requeue
        self.fail_queue = fail_queue
        self.liveness = settings.heartbeat_interval * settings.heartbeat_misses
        self.poller: zmq.Poller | None = None  # the zygote's pipe is watched there (set by `start`)

        self.workers: dict[bytes, Worker] = {}  # routable identity -> worker
        self.by_pid: dict[int, Worker] = {}
        self.generations: dict[tuple[str, int], int] = collections.Counter()
        # Worker groups: one per deployment of each profile (a profile without deployments is one,
        # named after it). The maps below are by group.
        self.groups = groups(settings)
        # Each profile's groups, their weights and the weights' total, once: reconcile runs after nearly every message.
        self.profile_groups = {
            name: [k for k, (n, _, _) in self.groups.items() if n == name] for name in settings.profiles
        }
        self.weights = {name: ([d.weight for d in p.deployments] or [1.0], sum(d.weight for d in p.deployments) or 1.0)
                        for name, p in settings.profiles.items()}  # fmt: skip
        self.no_shares = dict.fromkeys(self.groups, 0)  # nothing waiting: the usual case once a request is dealt
        self.free: dict[str, collections.deque[Worker]] = {g: collections.deque() for g in self.groups}
        self.spawn_failures: dict[str, int] = collections.Counter()
        self.replacing: dict[str, int] = collections.Counter()  # kills not yet matched by a respawn
        self.spawn_after: dict[str, float] = collections.defaultdict(float)
        self.retrying_until: dict[str, float] = collections.defaultdict(float)  # see RETRY_FIRST
        self.rewarm: dict[str, int] = collections.Counter()  # kills with requests not yet matched by a warm spawn

    def start(self, poller: zmq.Poller) -> None:
        self.poller = poller
        self.zygote.start()
        poller.register(self.zygote.fileno(), zmq.POLLIN)

    def close(self) -> None:
        for worker in list(self.workers.values()) + list(self.by_pid.values()):
            if worker.proc is not None:
                kill_group(worker.proc)
        self.zygote.stop()

    # ----- what workers and the zygote say --------------------------------------

    def on_heartbeat(self, beat: Heartbeat, now: float) -> None:
        worker = self.workers.get(beat.worker.encode())
        if worker is not None and hmac.compare_digest(worker.token, beat.token):
            worker.last_beat = now

    def on_ready(self, worker: Worker, ready: Ready, now: float) -> None:
        if not hmac.compare_digest(worker.token, ready.token):
            log.warning("a READY for worker %s without its token (not the process we forked): ignored", worker.ident)
            return
        worker.last_beat = now
        if ready.version != PROTOCOL_VERSION:
            log.error("worker %s speaks protocol %s, not %s", worker.ident, ready.version, PROTOCOL_VERSION)
            self.kill(worker, Reason.PROTOCOL, now)
            return
        worker.state = WorkerState.READY
        worker.capacity = max(1, ready.capacity)
        worker.idle_since = now
        self.spawn_failures[worker.group] = 0
        self.offer(worker)

    def on_zygote(self, now: float) -> None:
        reports = self.zygote.read()
        if reports is None:
            self.restart_zygote(f"the zygote exited (status {self.zygote.exit_status()})", now)
            return
        for report in reports:
            if isinstance(report, ZygoteReady):  # spawn clocks start now, not while the zygote was importing
                new = self.zygote.imported(report)
                log.info("zygote %d ready for %s in %.2fs; SDKs loaded: %s", report.pid, ", ".join(sorted(new)) or
                         "workers", now - self.zygote.started_at, ", ".join(report.sdks) or "none")  # fmt: skip
                for worker in self.workers.values():
                    if worker.state is WorkerState.STARTING and not worker.pid and self._kind(worker) in new:
                        worker.spawned_at = now
            elif isinstance(report, Spawned):
                self._forked(report.ident, report.pid)
            else:
                self.on_exit(report.pid, report.status, now)

    def _kind(self, worker: Worker) -> str:
        return self.groups[worker.group][2].kind

    def _forked(self, ident: str, pid: int) -> None:
        worker = self.workers.get(ident.encode())
        if worker is None:  # given up on (startup timeout) before the fork was reported
            kill_tree(pid)
            return
        worker.pid = pid
        worker.zygote = self.zygote_generation
        try:
            worker.proc = psutil.Process(worker.pid)
        except psutil.NoSuchProcess:
            pass  # already gone: its exit report follows
        self.by_pid[worker.pid] = worker

    def on_exit(self, pid: int, status: int, now: float) -> None:
        worker = self.by_pid.pop(pid, None)
        if worker is None:
            return
        self.stats.exits[str(status)] += 1
        if worker.state is not WorkerState.CONDEMNED:  # it died on its own
            log.warning("worker %s (pid %d) exited with status %d", worker.ident.decode(), pid, status)
            if worker.state is WorkerState.STARTING:
                self.spawn_failures[worker.group] += 1
            self.kill(worker, Reason.CRASH, now)

    def restart_zygote(self, why: str, now: float) -> None:
        """Replace the zygote; spawns it had not reported are asked of the new one."""
        log.error("%s; restarting it", why)
        self.stats.zygote_restarts += 1
        self.poller.unregister(self.zygote.fileno())  # type: ignore[union-attr]
        self.zygote.restart()
        self.zygote_generation += 1
        self.poller.register(self.zygote.fileno(), zmq.POLLIN)  # type: ignore[union-attr]
        for worker in self.workers.values():
            if worker.state is WorkerState.STARTING and not worker.pid:
                worker.spawned_at = now
                self.zygote.spawn(self._spec(worker))

    # ----- verbs ----------------------------------------------------------------

    def kill(self, worker: Worker, reason: Reason, now: float, culprit: Request | None = None) -> None:
        """The one way a worker is killed: SIGKILL its tree, count why, retry or fail its requests.
        With a `culprit` (the request that stalled), its other streams end as killed with a
        neighbour, not as stalls of their own."""
        if worker.proc is not None:
            kill_group(worker.proc)
            if worker.zygote != self.zygote_generation:  # no exit report will come for it
                self.by_pid.pop(worker.pid, None)
        if worker.state is not WorkerState.CONDEMNED:
            self.stats.kills[reason] += 1
            self.stats.note(now, "kill", f"{worker.ident.decode()} (pid {worker.pid}): {reason}")
            worker.state = WorkerState.CONDEMNED
            if reason not in (Reason.SHUTDOWN, Reason.SCALE_DOWN):
                self.replacing[worker.group] += 1
        self.workers.pop(worker.ident, None)
        requests = list(worker.requests.values())
        worker.requests.clear()
        for req in requests:
            req.worker = None
            if not req.cancelled:
                self.requeue(req, reason if culprit in (None, req) else Reason.NEIGHBOUR, now)
        if any(not req.cancelled for req in requests):
            self._replace_warm(worker.group, now)

    def _replace_warm(self, group: str, now: float) -> None:
        """A worker was killed with requests (a stall, most often): its replacement runs a first call once
        READY, so that the next stall's retry, which it is taken for before any fresh fork, does not pay a
        fresh fork's copy-on-write faults (~9 ms); and it is forked after RETRY_FIRST, unless requests wait."""
        self.rewarm[group] = min(self.rewarm[group] + 1, self.replacing[group])
        self.retrying_until[group] = now + RETRY_FIRST
        self.alarm.by(now + RETRY_FIRST)

    def reconcile(self, now: float, waiting: Mapping[str, int]) -> None:
        """Keep each group at busy + needed (for its share of its profile's `waiting` requests) +
        spare workers, within [min_workers, max_workers]."""
        mine: dict[str, list[Worker]] = {g: [] for g in self.groups}
        for worker in self.workers.values():
            mine[worker.group].append(worker)
        shares = self._shares(waiting, mine)
        for key, (name, _, profile) in self.groups.items():
            busy = sum(1 for w in mine[key] if w.requests)
            wanted = busy + -(-shares[key] // profile.concurrency) + profile.spare_workers
            target = max(profile.min_workers, min(profile.max_workers, wanted))
            missing = target - len(mine[key])
            if missing < 0:
                self._retire_idle(mine[key], -missing, now)
            if missing <= 0 or now < self.spawn_after[key]:
                continue
            if now < self.retrying_until[key] and not shares[key]:  # a spare's fork waits for the retries to start
                continue
            failures = self.spawn_failures[key]
            if failures:
                self.spawn_after[key] = now + min(self.settings.respawn_backoff_max, 0.05 * 2**failures)
                self.alarm.by(self.spawn_after[key])
                if failures >= 5 and all(self.spawn_failures[g] >= 5 for g in self.profile_groups[name]):
                    self.fail_queue(name, f"workers of profile {name!r} keep failing at start; see the broker's log")
                missing = 1
            for _ in range(missing):
                self._spawn(key, now)

    def _shares(self, waiting: Mapping[str, int], mine: dict[str, list[Worker]]) -> dict[str, int]:
        """Each group's share of its profile's waiting requests: by weight, or (`ordered`) in list order,
        each taking what its free room holds. Read only."""
        if not any(waiting.values()):
            return self.no_shares
        shares: dict[str, int] = {}
        for name, profile in self.settings.profiles.items():
            keys = self.profile_groups[name]
            if len(keys) == 1 or profile.strategy != "ordered":
                weights, total = self.weights[name]
                shares |= {k: -(-waiting[name] * w // total) for k, w in zip(keys, weights, strict=True)}
                continue
            left = waiting[name]
            for key in keys:
                group = self.groups[key][2]
                room = group.max_workers * group.concurrency - sum(len(w.requests) for w in mine[key])
                shares[key], left = min(left, max(0, room)), left - min(left, max(0, room))
            shares[keys[-1]] += left
        return {k: int(v) for k, v in shares.items()}

    def _retire_idle(self, workers: list[Worker], surplus: int, now: float) -> None:
        """Scale down: stop up to `surplus` workers idle for `idle_timeout`, longest idle first."""
        idle = [w for w in workers if w.state is WorkerState.READY and not w.requests]
        idle = [w for w in idle if now - w.idle_since >= self.settings.idle_timeout]
        for worker in sorted(idle, key=lambda w: w.idle_since)[:surplus]:
            self.kill(worker, Reason.SCALE_DOWN, now)

    def _spawn(self, group: str, now: float) -> None:
        taken = {w.slot for w in self.workers.values() if w.group == group}
        slot = next(i for i in range(len(taken) + 1) if i not in taken)
        generation = self.generations[(group, slot)]
        self.generations[(group, slot)] += 1
        ident = f"{group}.{slot}.{generation}".encode()
        profile, _, spec = self.groups[group]
        warm = self.rewarm[group] > 0
        self.rewarm[group] -= warm
        worker = Worker(ident, profile, slot, generation, now, spec.concurrency, group=group, warm=warm)
        self.workers[ident] = worker
        self.stats.spawns += 1
        if self.replacing[group]:
            self.replacing[group] -= 1
            self.stats.respawns += 1
        if not self.zygote.spawn(self._spec(worker)):
            log.error("could not reach the zygote; it will be restarted")
        self.alarm.by(now + self.settings.startup_timeout)

    def _spec(self, worker: Worker) -> WorkerSpec:
        return WorkerSpec(
            ident=worker.ident.decode(),
            backend=self.backend_url,
            profile=self.groups[worker.group][2],  # the deployment's settings merged in
            heartbeat_interval=self.settings.heartbeat_interval,
            death_fd=self.death_fd,
            token=worker.token,
            allow_overrides=self.settings.allow_overrides,
            log_level=self.settings.log_level,
            coalesce=self.settings.coalesce_ms / 1000,
            warm=worker.warm,
        )

    def offer(self, worker: Worker) -> None:
        """Put a worker with a free slot in its group's free queue (once): where it is taken next, or, for a
        one-stream worker that has served nothing and does not warm up (a fresh fork), where it is taken last
        (see `take`)."""
        if worker.free > 0 and not worker.queued_free:
            worker.queued_free = True
            if worker.served or worker.warm or self._end(worker.group) == 0:
                self.free[worker.group].append(worker)
            else:
                self.free[worker.group].appendleft(worker)

    def has_free(self, group: str) -> bool:
        """Whether the group has a worker with a free slot (dropping, from the end taken next, those
        that no longer have one)."""
        free, end = self.free[group], self._end(group)
        while free and free[end].free <= 0:
            self._take(group).queued_free = False
        return bool(free)

    def take(self, group: str) -> Worker:
        """A worker with a free slot, after `has_free`. One-stream workers are taken most recently used
        first, fresh forks last (a warm worker answers faster than a fresh fork, whose first request pays
        ~8 ms of copy-on-write page faults: a stall's retry must not land on the replacement of an earlier
        kill; the idle ones are those `idle_timeout` retires); multi-stream ones in turn, spreading streams
        so that one kill takes as few as possible."""
        worker = self._take(group)
        worker.queued_free = False
        return worker

    def _end(self, group: str) -> int:
        return -1 if self.groups[group][2].concurrency == 1 else 0

    def _take(self, group: str) -> Worker:
        free = self.free[group]
        return free.pop() if self._end(group) == -1 else free.popleft()

    def load(self, group: str) -> float:
        """Busy share of the group's slots (max_workers x concurrency)."""
        spec = self.groups[group][2]
        busy = sum(len(w.requests) for w in self.workers.values() if w.group == group)
        return busy / (spec.max_workers * spec.concurrency)

    def release(self, worker: Worker, req: Request, now: float) -> None:
        """The worker is done with the request: free the slot, or recycle a worker that served enough."""
        worker.requests.pop(req.key, None)
        req.worker = None
        worker.served += 1
        limit = self.settings.max_requests_per_worker
        if limit and worker.served >= limit and not worker.requests:
            self.kill(worker, Reason.RECYCLE, now)
            return
        if not worker.requests:
            worker.idle_since = now
        self.offer(worker)

    # ----- the watchdog's share: each returns when it is next due ----------------

    def expire_zygote(self, now: float) -> float:
        """A zygote still importing after its boot timeout is replaced; spawn requests wait for its pipe."""
        due = now + 1.0
        if not self.zygote.ready:
            if now - self.zygote.started_at > max(self.settings.startup_timeout, ZYGOTE_BOOT_TIMEOUT):
                self.restart_zygote("the zygote did not finish importing the SDKs in time", now)
            due = now + 0.1
        if self.zygote.outbox:
            due = min(due, now + 0.05)
        return due

    def expire_workers(self, now: float) -> float:
        """Workers not READY within startup_timeout, or whose heartbeats stopped, are killed."""
        due = now + 1.0
        for worker in list(self.workers.values()):
            if not (self.zygote.forks(self._kind(worker)) or worker.pid):
                continue  # its clock starts when the zygote has its SDK
            worker_at, reason = worker_due(worker, self.liveness, self.settings.startup_timeout)
            if now < worker_at:
                due = min(due, worker_at)
                continue
            if reason is Reason.HEARTBEAT and worker.state is WorkerState.READY and worker.proc is not None:
                due = min(due, self._ask_stacks(worker, now))  # diagnose before the kill
                continue
            if worker.state is WorkerState.HUNG:
                log.warning("worker %s: %s; its Python stacks:\n%s", worker.ident.decode(), reason,
                            stacks.read(worker.pid) or "(none: it did not answer)")  # fmt: skip
            else:
                log.warning("worker %s: %s", worker.ident.decode(), reason)
            self.kill(worker, reason, now)
            if reason is Reason.STARTUP and not worker.pid:
                self.restart_zygote(f"the zygote did not fork {worker.ident.decode()} within startup_timeout", now)
            elif reason is Reason.STARTUP:
                self.spawn_failures[worker.group] += 1
        return due

    def _ask_stacks(self, worker: Worker, now: float) -> float:
        """A worker whose heartbeats stopped is hung: ask it for its Python stacks, to be logged when
        it is killed, `stacks.GRACE` from now. It gets no new work meanwhile."""
        worker.state = WorkerState.HUNG
        worker.kill_at = now + stacks.GRACE
        try:
            worker.proc.send_signal(stacks.SIGNAL)  # type: ignore[union-attr]
        except psutil.Error:
            pass  # gone: its exit report follows
        return worker.kill_at

    def check_memory(self, now: float) -> None:
        limit = self.settings.max_memory_per_worker_mb * 1024 * 1024
        for worker in list(self.workers.values()):
            if worker.pid and _uss(worker.pid) > limit:
                log.warning("worker %s is over max_memory_per_worker_mb", worker.ident.decode())
                self.kill(worker, Reason.MEMORY, now)


def _uss(pid: int) -> int:
    """Unique memory: what killing the process frees (shared copy-on-write pages are not counted)."""
    try:
        return psutil.Process(pid).memory_full_info().uss
    except psutil.Error:
        return 0
