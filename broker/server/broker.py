"""The broker: one process, one `zmq.Poller` loop, no blocking calls on it.

Clients talk to a frontend ROUTER, workers to a backend ROUTER. Each pass of the
loop reads what arrived, then runs the same short, idempotent verbs: `expire`
(watchdog), `reconcile` (keep each profile's worker count right) and `dispatch`
(queued requests to free worker slots). Every kill goes through `kill_worker`,
counted by reason; a killed worker's unseen requests are retried on a fresh worker.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import logging
import os
import random
import resource
import signal
import time
from typing import Any

import psutil
import zmq

from .. import endpoints
from ..config import ZYGOTE_BOOT_TIMEOUT, Limits, Settings
from ..processes import kill_group, kill_tree
from ..protocol import PROTOCOL_VERSION, Code, Codec, ErrorInfo, Event, Kind, ProtocolError, Ref, Run, Submit
from ..protocol import Error as ErrorHeader
from ..wire.curve import CurveServer
from ..wire.zmqio import NOBLOCK, recv_frames, seed_routing_ids, send_frames
from .connections import Connections
from .fairqueue import FairQueue
from .state import Reason, Request, Worker, WorkerState
from .stats import Stats
from .watchdog import request_due, retry_delay, worker_due
from .zygote import Zygote

log = logging.getLogger(__name__)

_KIND = {kind: bytes([kind]) for kind in Kind}
_BATCH = 512  # messages read from one socket per pass, so neither side starves the other
_HOUSEKEEPING_INTERVAL = 1.0
_PARKED_FOR = 60.0  # how long answers wait for a client that stopped reading before they are dropped
_ABORT_GRACE = 5.0  # how long a worker has to confirm an ABORT before it is killed (its neighbours with it)
_ENDS = (_KIND[Kind.RESULT], _KIND[Kind.ERROR])


class Broker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = (
            endpoints.ensure_private_dir(settings.run_dir) if settings.run_dir else endpoints.private_run_dir()
        )
        self.frontend_url = settings.frontend or endpoints.ipc_url(self.run_dir, "frontend")
        self.backend_url = endpoints.ipc_url(self.run_dir, "backend")
        self.codec = Codec()
        self.stats = Stats()
        self.started = time.monotonic()
        self.liveness = settings.heartbeat_interval * settings.heartbeat_misses

        self.workers: dict[bytes, Worker] = {}  # routable identity -> worker
        self.by_pid: dict[int, Worker] = {}
        self.generations: dict[tuple[str, int], int] = collections.Counter()
        self.free: dict[str, collections.deque[Worker]] = {p: collections.deque() for p in settings.profiles}
        self.queues: dict[str, FairQueue] = {p: FairQueue() for p in settings.profiles}
        self.connections = Connections(
            settings.client_rate,
            settings.client_burst or max(1, int(settings.client_rate)),
            settings.client_queue_limit or settings.queue_limit,
            settings.client_queue_bytes_limit or settings.queue_bytes_limit // 4,
        )
        self.held_bytes = 0  # payloads of the requests in `self.requests`
        self.requests: dict[int, Request] = {}  # by key
        self.by_client: dict[tuple[bytes, int], Request] = {}
        self.next_key = 1
        self.next_check = 0.0
        self.next_housekeeping = 0.0
        self.spawn_failures: dict[str, int] = collections.Counter()
        self.replacing: dict[str, int] = collections.Counter()  # kills not yet matched by a respawn
        self.spawn_after: dict[str, float] = collections.defaultdict(float)
        self.draining_since: float | None = None
        self.stopped = False

        self.ctx = zmq.Context()
        seed_routing_ids()
        _raise_fd_limit()
        self.curve: CurveServer | None = None
        tcp = self.frontend_url.startswith("tcp://")
        if tcp and settings.curve_server_key:
            self.curve = CurveServer(self.ctx, settings.curve_server_key, settings.curve_clients_dir)
        elif tcp:
            log.warning("frontend %s has no CURVE authentication (insecure): whoever reaches it can "
                        "spend the provider keys", self.frontend_url)  # fmt: skip
        self.frontend = self._router(self.frontend_url, settings.client_buffer, self.curve)
        if tcp:  # the port chosen for `tcp://HOST:*`
            self.frontend_url = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend = self._router(self.backend_url, 1_000_000)
        self.death_r, self.death_w = os.pipe()  # workers exit when the write end (ours) closes
        kinds = tuple(sorted({p.kind for p in settings.profiles.values()}))
        self.zygote = Zygote(self.death_r, (self.run_dir, self.frontend_url, self.backend_url), kinds)
        self.zygote_generation = 0
        self.wake_r, self.wake_w = os.pipe()
        self.poller = zmq.Poller()
        self.parent_fd = -1
        self.signals_installed = False

    # ----- set-up and tear-down -------------------------------------------------

    def _router(self, url: str, sndhwm: int, curve: CurveServer | None = None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        if curve is not None:
            curve.secure(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.RCVHWM, 1_000_000)
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes + 65536)
        sock.bind(url)
        endpoints.restrict(url)
        return sock

    def start(self) -> None:
        """Start the zygote and the minimum workers; install signal handlers if on the main thread."""
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.zygote.start()
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        self.poller.register(self.zygote.fileno(), zmq.POLLIN)
        self.poller.register(self.wake_r, zmq.POLLIN)
        self.reconcile(time.monotonic())

    def stop_when_closed(self, fd: int) -> None:
        """Stop at once when `fd` reaches end of file: an embedded broker's parent has died."""
        self.parent_fd = fd
        os.set_blocking(fd, False)
        self.poller.register(fd, zmq.POLLIN)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a graceful drain; handlers only enqueue (the wake-up pipe)."""
        signal.set_wakeup_fd(self.wake_w)
        self.signals_installed = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)

    def drain(self) -> None:
        """Stop accepting; finish in-flight work within `drain_timeout`, then stop."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            for queue in self.queues.values():
                for req in queue.clear():
                    self._finish(req, Code.SHUTTING_DOWN, "the pool is shutting down")

    def close(self) -> None:
        """Kill every worker and the zygote, close sockets, remove socket files. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        for req in list(self.requests.values()):
            self._finish(req, Code.SHUTTING_DOWN, "the pool stopped before this request finished")
        for worker in list(self.workers.values()) + list(self.by_pid.values()):
            if worker.proc is not None:
                kill_group(worker.proc)
        self.zygote.stop()
        os.close(self.death_w)
        if self.signals_installed:  # a late signal would write to the closed pipe ("Exception ignored ... EBADF")
            signal.set_wakeup_fd(-1)
        for fd in (self.death_r, self.wake_r, self.wake_w):
            os.close(fd)
        self.frontend.close(linger=500)  # let the final answers above reach their callers
        self.backend.close(0)
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()
        endpoints.cleanup(self.run_dir, self.frontend_url, self.backend_url)

    # ----- the loop -------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                timeout = max(0.0, min(self.next_check, now + 1.0) - now)
                ready = dict(self.poller.poll(timeout * 1000))
                if self.wake_r in ready:
                    self._on_signal()
                if self.parent_fd in ready and not _read_some(self.parent_fd):
                    log.info("the process that owns this pool closed it (or died); stopping")
                    return
                if self.backend in ready:
                    self._read(self.backend, self.on_backend)
                if self.frontend in ready:
                    self._read(self.frontend, self.on_frontend)
                if self.zygote.fileno() in ready:
                    self.on_zygote()
                if self.zygote.outbox:
                    self.zygote.flush()
                now = time.monotonic()
                self.expire(now)
                self.dispatch(now)  # before reconcile: a retry is sent before its replacement is forked
                self.reconcile(now)
                if self.draining_since is not None and self._drained(now):
                    return
        finally:
            self.close()

    def _on_signal(self) -> None:
        try:
            os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        log.warning(
            "signal received: draining (finishing in-flight requests for up to %gs)", self.settings.drain_timeout
        )
        self.drain()

    def _drained(self, now: float) -> bool:
        return not self.requests or now - self.draining_since > self.settings.drain_timeout  # type: ignore[operator]

    def _read(self, sock: zmq.Socket, handle: Any) -> None:
        for _ in range(_BATCH):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            handle(frames[0], frames[1:])

    # ----- clients --------------------------------------------------------------

    def on_frontend(self, client: bytes, frames: list[bytes]) -> None:
        try:
            kind, header, payload = self.codec.parse(frames)
        except ProtocolError as exc:
            self.stats.rejected[Code.PROTOCOL] += 1
            self._reply_error(client, 0, Code.PROTOCOL, str(exc))
            return
        if kind == Kind.SUBMIT:
            self.on_submit(client, header, payload)
        elif kind == Kind.CANCEL:
            self.on_cancel(client, header.rid)
        elif self._parked(client):  # what it asks would only pile up behind the answers it does not read
            self.stats.rejected[Code.SATURATED] += 1
        elif kind == Kind.PING:
            self._send_client(client, [_KIND[Kind.RESULT], self.codec.encode(Ref(header.rid)), b""])
        elif kind == Kind.STATS:
            self._send_client(
                client, [_KIND[Kind.RESULT], self.codec.encode(Ref(header.rid)), self.codec.encode(self.snapshot())]
            )
        else:
            self.stats.rejected[Code.PROTOCOL] += 1
            self._reply_error(client, getattr(header, "rid", 0), Code.PROTOCOL, f"{kind.name} is not a client message")

    def _parked(self, client: bytes) -> bool:
        conn = self.connections.get(client)
        return conn is not None and conn.parked is not None

    def on_submit(self, client: bytes, sub: Submit, payload: bytes) -> None:
        try:
            sub = self.settings.bound(sub)
        except ValueError as exc:
            refusal: tuple[Code, str] | None = (Code.BAD_REQUEST, str(exc))
        else:
            refusal = self._refusal(client, sub, payload)
        if refusal is not None:
            self.stats.rejected[refusal[0]] += 1
            self._reply_error(client, sub.rid, *refusal)
            return
        now = time.monotonic()
        fet, stale, deadline = self.settings.limits(
            sub.profile, sub.model, Limits(sub.first_event_timeout, sub.stale_timeout, sub.deadline)
        )
        if sub.read_timeout:
            fet, stale = min(fet, sub.read_timeout), min(stale, sub.read_timeout)
        req = Request(self.next_key, client, sub.rid, sub, payload, sub.profile, fet, stale, now + deadline, now)
        if sub.first_event_timeout or sub.stale_timeout or sub.read_timeout:  # the pool's own, only if it set one
            pool_fet, pool_stale, _ = self.settings.limits(sub.profile, sub.model, Limits())
            if fet < pool_fet:
                req.own_limits.add(Reason.FIRST_EVENT)
            if stale < pool_stale:
                req.own_limits.add(Reason.STALE)
        self.next_key += 1
        self.requests[req.key] = req
        self.held_bytes += len(payload)
        self.by_client[(client, sub.rid)] = req
        self.queues[req.profile].push(req)
        self.stats.requests["accepted"] += 1
        self.next_check = min(self.next_check, req.deadline_at)

    def _refusal(self, client: bytes, sub: Submit, payload: bytes) -> tuple[Code, str] | None:
        if self.draining_since is not None:
            return Code.SHUTTING_DOWN, "the pool is shutting down and accepts no new requests"
        if sub.profile not in self.settings.profiles:
            known = ", ".join(self.settings.profiles)
            return Code.BAD_REQUEST, f"unknown provider profile {sub.profile!r}; this pool has: {known}"
        if len(payload) > self.settings.max_message_bytes:
            return Code.BAD_REQUEST, f"request of {len(payload)} bytes exceeds max_message_bytes"
        if (client, sub.rid) in self.by_client:
            return Code.BAD_REQUEST, f"request id {sub.rid} is already in flight for this client"
        if len(self.requests) >= self.settings.queue_limit:
            return Code.SATURATED, f"pool saturated: {len(self.requests)} requests in flight (queue_limit)"
        if self.held_bytes + len(payload) > self.settings.queue_bytes_limit:
            return Code.SATURATED, f"pool saturated: requests hold {self.held_bytes} bytes (queue_bytes_limit)"
        return self.connections.admit(client, time.monotonic(), len(payload))

    def on_cancel(self, client: bytes, crid: int) -> None:
        req = self.by_client.get((client, crid))
        if req is not None:
            self._cancel(req, "cancelled by the caller")

    def _cancel(self, req: Request, why: str) -> None:
        """End the request for its caller now; a worker running it is told to abort (killed if it does not)."""
        if req.key not in self.requests:  # already ended (while cancelling a vanished caller's others)
            return
        worker = req.worker
        self._finish(req, Code.CANCELLED, why)
        if worker is not None:
            req.cancelled = True
            req.abort_at = time.monotonic() + _ABORT_GRACE
            worker.requests[req.key] = req  # keep the slot busy until the worker confirms
            self._send_worker(worker, [_KIND[Kind.ABORT], self.codec.encode(Ref(req.key))])
            self.next_check = min(self.next_check, req.abort_at)

    # ----- workers --------------------------------------------------------------

    def on_backend(self, ident: bytes, frames: list[bytes]) -> None:
        try:
            kind, header, payload = self.codec.parse(frames)
        except ProtocolError as exc:
            log.warning("dropping a malformed message from worker %r: %s", ident, exc)
            return
        if kind == Kind.HEARTBEAT:
            worker = self.workers.get(header.worker.encode())
            if worker is not None and hmac.compare_digest(worker.token, header.token):
                worker.last_beat = time.monotonic()
            return
        worker = self.workers.get(ident)
        if worker is None:
            return  # a killed predecessor's last words
        if kind == Kind.READY:
            if not hmac.compare_digest(worker.token, header.token):
                log.warning("a READY for worker %s without its token (not the process we forked): ignored", ident)
                return
            worker.last_beat = time.monotonic()
            self.on_ready(worker, header)
            return
        worker.last_beat = time.monotonic()
        req = worker.requests.get(header.rid)
        if req is None:
            return
        if req.cancelled:
            if kind in (Kind.RESULT, Kind.ERROR):
                self._release(worker, req)
            return
        if kind == Kind.EVENT:
            self.on_event(req, header, payload)
        elif kind == Kind.PROGRESS:
            self._progress(req)
        elif kind == Kind.HEAD:
            req.head = payload
        elif kind == Kind.RESULT:
            self.on_result(worker, req, payload)
        elif kind == Kind.ERROR:
            self._release(worker, req)
            if header.code == Code.PROVIDER_CONNECTION and not req.delivered:
                self._retry_or_fail(req, Reason.CONNECTION, payload)
                return
            header_frame = self.codec.encode(ErrorHeader(req.crid, header.code))
            self._forward_end(req, [_KIND[Kind.ERROR], header_frame, payload], f"error:{header.code}")

    def on_ready(self, worker: Worker, ready: Any) -> None:
        if ready.version != PROTOCOL_VERSION:
            log.error("worker %s speaks protocol %s, not %s", worker.ident, ready.version, PROTOCOL_VERSION)
            self.kill_worker(worker, Reason.PROTOCOL)
            return
        worker.state = WorkerState.READY
        worker.capacity = max(1, ready.capacity)
        worker.idle_since = time.monotonic()
        self.spawn_failures[worker.profile] = 0
        self._offer(worker)

    def on_event(self, req: Request, event: Event, data: bytes) -> None:
        self._progress(req)
        if req.head is not None:
            if not self._send_client(req.client, [_KIND[Kind.HEAD], self.codec.encode(Ref(req.crid)), req.head]):
                return
            req.head = None
        header = self.codec.encode(Event(req.crid, event.seq, event.count))
        if self._send_client(req.client, [_KIND[Kind.EVENT], header, data]):
            req.delivered += event.count

    def _progress(self, req: Request) -> None:
        """A real event arrived: restart the stale clock (the first one switches from first_event_timeout)."""
        now = time.monotonic()
        if req.last_event_at is None:
            self.stats.first_event.add(now - req.sent_at)
            self.next_check = min(self.next_check, now + req.stale_timeout)
        req.last_event_at = now

    def on_result(self, worker: Worker, req: Request, payload: bytes) -> None:
        self._release(worker, req)
        self.stats.latency.add(time.monotonic() - req.accepted_at)
        self._forward_end(req, [_KIND[Kind.RESULT], self.codec.encode(Ref(req.crid)), payload or req.head or b""], "ok")

    def on_zygote(self) -> None:
        reports = self.zygote.read()
        if reports is None:
            self._restart_zygote(f"the zygote exited (status {self.zygote.exit_status()})")
            return
        for report in reports:
            if "ready" in report:  # spawn clocks start now, not while the zygote was importing
                now = time.monotonic()
                log.info("zygote %d ready in %.2fs; SDKs loaded: %s", report["ready"], now - self.zygote.started_at,
                         ", ".join(report["sdks"]) or "none")  # fmt: skip
                for worker in self.workers.values():
                    if worker.state is WorkerState.STARTING and not worker.pid:
                        worker.spawned_at = now
            elif "spawned" in report:
                worker = self.workers.get(report["spawned"].encode())
                if worker is None:  # given up on (startup timeout) before the fork was reported
                    kill_tree(report["pid"])
                    continue
                worker.pid = report["pid"]
                worker.zygote = self.zygote_generation
                try:
                    worker.proc = psutil.Process(worker.pid)
                except psutil.NoSuchProcess:
                    pass  # already gone: its exit report follows
                self.by_pid[worker.pid] = worker
            elif "exited" in report:
                self.on_exit(report["exited"], report["status"])

    def on_exit(self, pid: int, status: int) -> None:
        worker = self.by_pid.pop(pid, None)
        if worker is None:
            return
        self.stats.exits[str(status)] += 1
        if worker.state is not WorkerState.CONDEMNED:  # it died on its own
            log.warning("worker %s (pid %d) exited with status %d", worker.ident.decode(), pid, status)
            if worker.state is WorkerState.STARTING:
                self.spawn_failures[worker.profile] += 1
            self.kill_worker(worker, Reason.CRASH)

    def _restart_zygote(self, why: str) -> None:
        """Replace the zygote; spawns it had not reported are asked of the new one."""
        log.error("%s; restarting it", why)
        self.stats.zygote_restarts += 1
        self.poller.unregister(self.zygote.fileno())
        self.zygote.restart()
        self.zygote_generation += 1
        self.poller.register(self.zygote.fileno(), zmq.POLLIN)
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.state is WorkerState.STARTING and not worker.pid:
                worker.spawned_at = now
                self.zygote.spawn(self._spec(worker))

    # ----- verbs ----------------------------------------------------------------

    def kill_worker(self, worker: Worker, reason: Reason, culprit: Request | None = None) -> None:
        """The one way a worker is killed: SIGKILL its tree, count why, retry or fail its requests.
        With a `culprit` (the request that stalled), its other streams end as killed with a
        neighbour, not as stalls of their own."""
        if worker.proc is not None:
            kill_group(worker.proc)
            if worker.zygote != self.zygote_generation:  # no exit report will come for it
                self.by_pid.pop(worker.pid, None)
        if worker.state is not WorkerState.CONDEMNED:
            self.stats.kills[reason] += 1
            worker.state = WorkerState.CONDEMNED
            if reason not in (Reason.SHUTDOWN, Reason.SCALE_DOWN):
                self.replacing[worker.profile] += 1
        self.workers.pop(worker.ident, None)
        requests = list(worker.requests.values())
        worker.requests.clear()
        for req in requests:
            req.worker = None
            if not req.cancelled:
                self._retry_or_fail(req, reason if culprit in (None, req) else Reason.NEIGHBOUR)

    def _shed(self, worker: Worker, req: Request, reason: Reason) -> None:
        """Take one stream off a worker that carries others, when a limit of the request's own
        (its deadline, or a time limit tighter than the pool's) passed: the worker is told to
        abort it (and killed if it does not), the request is retried or ended like a killed one,
        and the neighbours go on. A caller's short limit never kills another caller's stream."""
        log.info("request %d on worker %s: %s (its own limit)", req.key, worker.ident.decode(), reason)
        now = time.monotonic()
        tombstone = dataclasses.replace(req, cancelled=True, abort_at=now + _ABORT_GRACE)
        worker.requests[req.key] = tombstone  # the slot stays busy until the worker confirms
        self._send_worker(worker, [_KIND[Kind.ABORT], self.codec.encode(Ref(req.key))])
        req.worker = None
        del self.requests[req.key]  # a retry runs under a new key: the old one is the worker's until it confirms
        req.key, self.next_key = self.next_key, self.next_key + 1
        self.requests[req.key] = req
        self._retry_or_fail(req, reason)

    def _retry_or_fail(self, req: Request, reason: Reason, last_error: bytes = b"") -> None:
        """Requeue an unseen request (bounded, jittered), or end it with the error that says why not."""
        req.history.append(reason)
        if reason.is_stall:
            self.stats.stalls[reason] += 1
        now = time.monotonic()
        if reason is Reason.DEADLINE or now >= req.deadline_at:
            self._finish(req, Code.DEADLINE, f"deadline of the request passed after {req.attempt} attempt(s)")
        elif req.delivered:
            code = Code.STALLED if reason.is_stall else Code.WORKER_LOST
            self._finish(req, code, f"{reason} after {req.delivered} event(s) were delivered; not retried")
        elif req.attempt >= (req.submit.max_attempts or self.settings.max_attempts):
            if last_error:  # the provider's own error is the most useful answer
                header = self.codec.encode(ErrorHeader(req.crid, Code.PROVIDER_CONNECTION))
                self._forward_end(req, [_KIND[Kind.ERROR], header, last_error], f"error:{Code.PROVIDER_CONNECTION}")
                return
            tried = ", ".join(req.history)
            self._finish(req, Code.ATTEMPTS_EXHAUSTED, f"gave up after {req.attempt} attempt(s): {tried}")
        else:
            self.stats.retries += 1
            req.head = None
            req.last_event_at = None
            delay = retry_delay(req.attempt + 1, self.settings.retry_backoff, 5.0, random.random())
            req.not_before = now + delay
            self.next_check = min(self.next_check, req.not_before)
            self.queues[req.profile].push(req, front=True)

    def expire(self, now: float) -> None:
        """The watchdog pass: stalls, deadlines, heartbeats, startups, abort timeouts; once a
        second also parked answers, idle connection records and worker memory."""
        if now < self.next_check:
            return
        next_check = now + 1.0
        if not self.zygote.ready:
            if now - self.zygote.started_at > max(self.settings.startup_timeout, ZYGOTE_BOOT_TIMEOUT):
                self._restart_zygote("the zygote did not finish importing the SDKs in time")
            next_check = min(next_check, now + 0.1)
        if self.zygote.outbox:  # spawn requests wait for its pipe
            next_check = min(next_check, now + 0.05)
        for worker in list(self.workers.values()):
            if not (self.zygote.ready or worker.pid):
                continue  # its clock starts when the zygote is ready
            due, reason = worker_due(worker, self.liveness, self.settings.startup_timeout)
            if now >= due:
                log.warning("worker %s: %s", worker.ident.decode(), reason)
                self.kill_worker(worker, reason)
                if reason is Reason.STARTUP and not worker.pid:
                    self._restart_zygote(f"the zygote did not fork {worker.ident.decode()} within startup_timeout")
                elif reason is Reason.STARTUP:
                    self.spawn_failures[worker.profile] += 1
                continue
            next_check = min(next_check, due)
            for req in list(worker.requests.values()):
                if req.cancelled:
                    if now >= req.abort_at:
                        self.kill_worker(worker, Reason.ABORT)
                        break
                    next_check = min(next_check, req.abort_at)
                    continue
                due, reason = request_due(req)
                if now >= due and reason in req.own_limits and len(worker.requests) > 1:
                    self._shed(worker, req, reason)  # its own limit: the neighbours' streams are healthy
                    next_check = min(next_check, now + _ABORT_GRACE)
                elif now >= due:
                    log.info("request %d on worker %s: %s", req.key, worker.ident.decode(), reason)
                    self.kill_worker(worker, reason, req)
                    break
                next_check = min(next_check, due)
        for queue in self.queues.values():
            for req in [r for r in queue if now >= r.deadline_at]:
                queue.remove(req)
                self._finish(req, Code.DEADLINE, "deadline passed while the request was queued")
            next_check = min(next_check, queue.next_due(now))
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + _HOUSEKEEPING_INTERVAL
            self._resend_parked(now)
            self.connections.prune(now)
            if self.settings.max_memory_per_worker_mb:
                self._check_memory()
        self.next_check = next_check

    def _check_memory(self) -> None:
        limit = self.settings.max_memory_per_worker_mb * 1024 * 1024
        for worker in list(self.workers.values()):
            if worker.pid and _uss(worker.pid) > limit:
                log.warning("worker %s is over max_memory_per_worker_mb", worker.ident.decode())
                self.kill_worker(worker, Reason.MEMORY)

    def reconcile(self, now: float) -> None:
        """Keep each profile at busy + needed + spare workers, within [min_workers, max_workers]."""
        if self.draining_since is not None:
            return
        for name, profile in self.settings.profiles.items():
            mine = [w for w in self.workers.values() if w.profile == name]
            busy = sum(1 for w in mine if w.requests)
            waiting = len(self.queues[name])
            wanted = busy + -(-waiting // profile.concurrency) + profile.spare_workers
            target = max(profile.min_workers, min(profile.max_workers, wanted))
            missing = target - len(mine)
            if missing < 0:
                self._retire_idle(mine, -missing, now)
            if missing <= 0 or now < self.spawn_after[name]:
                continue
            failures = self.spawn_failures[name]
            if failures:
                self.spawn_after[name] = now + min(self.settings.respawn_backoff_max, 0.05 * 2**failures)
                self.next_check = min(self.next_check, self.spawn_after[name])
                if failures >= 5:
                    self._fail_queue(name, f"workers of profile {name!r} keep failing at start; see the broker's log")
                missing = 1
            for _ in range(missing):
                self._spawn(name, now)

    def _retire_idle(self, workers: list[Worker], surplus: int, now: float) -> None:
        """Scale down: stop up to `surplus` workers idle for `idle_timeout`, longest idle first."""
        idle = [w for w in workers if w.state is WorkerState.READY and not w.requests]
        idle = [w for w in idle if now - w.idle_since >= self.settings.idle_timeout]
        for worker in sorted(idle, key=lambda w: w.idle_since)[:surplus]:
            self.kill_worker(worker, Reason.SCALE_DOWN)

    def _fail_queue(self, profile: str, why: str) -> None:
        for req in self.queues[profile].clear():
            self._finish(req, Code.CONFIG, why)

    def _spawn(self, profile: str, now: float) -> None:
        taken = {w.slot for w in self.workers.values() if w.profile == profile}
        slot = next(i for i in range(len(taken) + 1) if i not in taken)
        generation = self.generations[(profile, slot)]
        self.generations[(profile, slot)] += 1
        ident = f"{profile}.{slot}.{generation}".encode()
        worker = Worker(ident, profile, slot, generation, now, self.settings.profiles[profile].concurrency)
        self.workers[ident] = worker
        self.stats.spawns += 1
        if self.replacing[profile]:
            self.replacing[profile] -= 1
            self.stats.respawns += 1
        if not self.zygote.spawn(self._spec(worker)):
            log.error("could not reach the zygote; it will be restarted")
        self.next_check = min(self.next_check, now + self.settings.startup_timeout)

    def _spec(self, worker: Worker) -> dict[str, Any]:
        return {
            "ident": worker.ident.decode(),
            "backend": self.backend_url,
            "profile": self.settings.profiles[worker.profile],
            "heartbeat_interval": self.settings.heartbeat_interval,
            "death_fd": self.death_r,
            "token": worker.token,
            "allow_overrides": self.settings.allow_overrides,
            "log_level": self.settings.log_level,
        }

    def dispatch(self, now: float) -> None:
        """Queued requests to free worker slots.

        One-stream workers are taken most recently used first: a warm worker answers faster
        than a fresh fork (whose first request pays ~7 ms of copy-on-write page faults), and
        the workers left idle are the ones `idle_timeout` retires. Multi-stream workers are
        taken in turn, spreading streams so that one kill takes as few as possible."""
        for name, queue in self.queues.items():
            free = self.free[name]
            take = free.pop if self.settings.profiles[name].concurrency == 1 else free.popleft
            while queue and free:
                worker = take()
                worker.queued_free = False
                if worker.state is not WorkerState.READY or worker.free <= 0:
                    continue
                req = queue.pop(now)
                if req is None:  # only retries waiting out their backoff are left
                    self._offer(worker)
                    break
                self._run(worker, req, now)
                self._offer(worker)

    def _run(self, worker: Worker, req: Request, now: float) -> None:
        req.attempt += 1
        req.worker = worker
        req.sent_at = now
        worker.requests[req.key] = req
        header = self.codec.encode(Run(req.key, req.attempt))
        if not self._send_worker(worker, [_KIND[Kind.RUN], header, req.payload]):
            return
        self.next_check = min(self.next_check, request_due(req)[0])

    def _offer(self, worker: Worker) -> None:
        """Put a worker with a free slot at the back of its profile's free queue (once)."""
        if worker.free > 0 and not worker.queued_free:
            worker.queued_free = True
            self.free[worker.profile].append(worker)

    def _release(self, worker: Worker, req: Request) -> None:
        """The worker is done with the request: free the slot, or recycle a worker that served enough."""
        worker.requests.pop(req.key, None)
        req.worker = None
        worker.served += 1
        limit = self.settings.max_requests_per_worker
        if limit and worker.served >= limit and not worker.requests:
            self.kill_worker(worker, Reason.RECYCLE)
            return
        if not worker.requests:
            worker.idle_since = time.monotonic()
        self._offer(worker)

    # ----- answers --------------------------------------------------------------

    def _finish(self, req: Request, code: Code, message: str) -> None:
        """End a request with a broker-made error (exactly one answer)."""
        info = ErrorInfo(code, message, delivered=req.delivered, attempts=req.attempt)
        frames = [_KIND[Kind.ERROR], self.codec.encode(ErrorHeader(req.crid, code)), self.codec.encode(info)]
        self._forward_end(req, frames, "cancelled" if code == Code.CANCELLED else f"error:{code}")

    def _forward_end(self, req: Request, frames: list[bytes], outcome: str) -> None:
        """Send a live request's one answer and count its outcome; nothing for one already ended."""
        if self.requests.pop(req.key, None) is None:
            return
        self.stats.requests[outcome] += 1
        self.held_bytes -= len(req.payload)
        self.by_client.pop((req.client, req.crid), None)
        self.connections.done(req.client, len(req.payload))
        if req.queued:
            self.queues[req.profile].remove(req)
        elif req.worker is not None:
            req.worker.requests.pop(req.key, None)
        self._send_client(req.client, frames)

    def _reply_error(self, client: bytes, rid: int, code: Code, message: str) -> None:
        if self._parked(client):  # it reads nothing: a refusal would only pile up behind its answers
            return
        info = self.codec.encode(ErrorInfo(code, message))
        self._send_client(client, [_KIND[Kind.ERROR], self.codec.encode(ErrorHeader(rid, code)), info])

    def _send_client(self, client: bytes, frames: list[bytes]) -> bool:
        """Send to a caller; one that is gone or stopped reading has its requests cancelled.

        A caller that stopped reading (EAGAIN: `client_buffer` messages wait for it) keeps its
        final answers parked for `_PARKED_FOR` seconds, so each of its requests still ends in
        one answer if it resumes; the broker's memory stays bounded meanwhile."""
        conn = self.connections.get(client)
        if conn is not None and conn.parked is not None:
            if frames[0] in _ENDS:
                conn.parked.append(frames)
            return False
        try:
            send_frames(self.frontend, [client, *frames], NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            gone = exc.errno == zmq.EHOSTUNREACH  # the caller is gone (F11); else EAGAIN
            log.info("client %s %s: cancelling its requests", _who(client), "went away" if gone else "stopped reading")
            self.connections.park(client, frames if frames[0] in _ENDS else None, time.monotonic())
            why = (
                "the caller went away"
                if gone
                else f"the caller stopped reading ({self.settings.client_buffer} messages waiting; client_buffer)"
            )
            for (owner, _), req in list(self.by_client.items()):
                if owner == client:
                    self._cancel(req, why)
            if gone:
                self.connections.forget(client)
            return False

    def _resend_parked(self, now: float) -> None:
        """Try again (once a second) to hand parked answers to callers that stopped reading."""
        for client, conn in self.connections.parked():
            answers = conn.parked
            while answers:
                try:
                    send_frames(self.frontend, [client, *answers[0]], NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:  # gone for good
                    answers.clear()
                    break
                answers.pop(0)
            if not answers:
                self.connections.unpark(client)
            elif now - conn.parked_at > _PARKED_FOR:
                log.warning("client %s did not read for %gs: dropping %d answers for it",
                            _who(client), _PARKED_FOR, len(answers))  # fmt: skip
                self.connections.forget(client)

    def _send_worker(self, worker: Worker, frames: list[bytes]) -> bool:
        try:
            send_frames(self.backend, [worker.ident, *frames], NOBLOCK)
            return True
        except zmq.ZMQError:
            self.kill_worker(worker, Reason.CRASH)
            return False

    # ----- stats ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = []
        for worker in sorted(self.workers.values(), key=lambda w: (w.profile, w.slot)):
            workers.append(
                {
                    "ident": worker.ident.decode(),
                    "profile": worker.profile,
                    "pid": worker.pid,
                    "state": worker.state.value if not worker.requests else "busy",
                    "requests": [r.key for r in worker.requests.values()],
                    "age": round(now - worker.spawned_at, 3),
                    "served": worker.served,
                    "rss": _rss(worker.pid) if worker.pid else 0,
                }
            )
        return {
            "pid": os.getpid(),
            "uptime": round(now - self.started, 3),
            "frontend": self.frontend_url,
            "zygote_pid": self.zygote.pid,
            "queued": {name: len(q) for name, q in self.queues.items()},
            "in_flight": len(self.requests),
            "connections": len(self.connections),
            "draining": self.draining_since is not None,
            "allow_overrides": self.settings.allow_overrides,
            "capacity": {name: p.max_workers * p.concurrency for name, p in self.settings.profiles.items()},
            "workers": workers,
            **self.stats.snapshot(),
        }


def _who(client: bytes) -> str:
    """A client's name for the log: a hash of its routing id (the id itself would show the counter
    libzmq generates ids from, and let a reader of the log claim the next ones)."""
    return hashlib.blake2b(client, digest_size=4).hexdigest()


def _raise_fd_limit() -> None:
    """Every client connection costs the broker a descriptor, and libzmq's ipc listener aborts the
    process when accept() finds none left: take as many as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _read_some(fd: int) -> bool:
    """False at end of file."""
    try:
        return bool(os.read(fd, 4096))
    except BlockingIOError:
        return True


def _uss(pid: int) -> int:
    """Unique memory: what killing the process frees (shared copy-on-write pages are not counted)."""
    try:
        return psutil.Process(pid).memory_full_info().uss
    except psutil.Error:
        return 0


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0
