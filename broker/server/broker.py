"""The broker: one process, one `zmq.Poller` loop, no blocking calls on it.

Clients talk to a frontend ROUTER, workers to a backend ROUTER. Each pass of the
loop reads what arrived, then runs the same short, idempotent verbs: `expire`
(watchdog), `dispatch` (queued requests to free worker slots) and `reconcile` (keep
each profile's worker count right). The work is split by concern: `Fleet` (fleet.py)
owns the workers and the zygote, `Flow` (flow.py) the requests; this module owns the
sockets and the loop, and routes each message to the one that handles it.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from typing import Any

import psutil
import zmq

from .. import endpoints, prices
from ..config import FAMILIES, Settings
from ..processes import stop_signals
from ..protocol import Code, Codec, Kind, ProtocolError, Ref, Snapshot, WorkerSnapshot
from ..wire.curve import CurveServer
from ..wire.zmqio import BIG_HWM, new_socket, recv_frames, seed_routing_ids
from . import tracing
from .fleet import Fleet
from .flow import Flow
from .requestlog import RequestLog
from .stats import Stats
from .watchdog import Alarm
from .zygote import Zygote

log = logging.getLogger(__name__)

_BATCH = 512  # messages read from one socket per pass, so neither side starves the other
_HOUSEKEEPING_INTERVAL = 1.0
# What a worker says of a running stream: the fleet and the queues stay as they were (no reconcile due).
_STREAM_TRAFFIC = frozenset((Kind.HEAD, Kind.EVENT, Kind.PROGRESS, Kind.USAGE, Kind.ENDING))
_REQUEST_RECORDS = _STREAM_TRAFFIC | {Kind.RESULT, Kind.ERROR}  # what may share a worker's message
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
STREAMS_SHOWN = 50  # requests in flight listed in a snapshot (the oldest): `isopool top` shows them


class Broker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = (
            endpoints.ensure_private_dir(settings.run_dir) if settings.run_dir else endpoints.private_run_dir()
        )
        self.frontend_url = settings.frontend or endpoints.ipc_url(self.run_dir, "frontend")
        self.backend_url = endpoints.ipc_url(self.run_dir, "backend")
        self.codec = Codec()
        self.stats = Stats(prices.load(settings.prices) if settings.prices else None)
        self.alarm = Alarm()
        self.started = time.monotonic()
        self.next_housekeeping = 0.0
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
        self.run_lock = endpoints.RunDirLock.take(self.run_dir)  # before binding: a bind replaces a socket file
        self.frontend = self._router(self.frontend_url, settings.client_buffer, self.curve)
        if tcp:  # the port chosen for `tcp://HOST:*`
            self.frontend_url = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend = self._router(self.backend_url, BIG_HWM)
        self.death_r, self.death_w = os.pipe()  # workers exit when the write end (ours) closes
        # imported in the profiles' order; a dormant profile's cloud libraries only by the worker that needs them
        kinds = tuple(dict.fromkeys(p.kind if p.min_workers else FAMILIES[p.kind] for p in settings.profiles.values()))
        zygote = Zygote(self.death_r, (self.run_dir, self.frontend_url, self.backend_url), kinds)
        # a killed worker's requests, and a flapping profile's queue, are the flow's to retry or end
        self.fleet = Fleet(
            settings,
            self.stats,
            self.alarm,
            zygote,
            self.backend_url,
            self.death_r,
            requeue=lambda req, reason, now: self.flow.retry_or_fail(req, reason, now),
            fail_queue=lambda profile, why: self.flow.fail_queue(profile, why),
        )
        self.request_log = (
            RequestLog(settings.request_log, settings.request_log_max_bytes, settings.request_log_backups)
            if settings.request_log
            else None
        )
        self.tracing = tracing.from_environment(settings)
        self.flow = Flow(settings, self.stats, self.alarm, self.codec, self.fleet, self.frontend, self.backend,
                         self.request_log, self.tracing)  # fmt: skip
        self.wake_r, self.wake_w = os.pipe()
        self.poller = zmq.Poller()
        self.parent_fd = -1
        self.signals_installed = False
        # Whether the pass may have changed the fleet or a queue, which reconcile (~60 µs) then acts on. A
        # stream's traffic never does; the watchdog's pass runs at least once a second, for idle workers.
        self.changed = True
        self.from_callers = self.from_workers = 0  # messages received on each hop (heartbeats not counted)

    # ----- set-up and tear-down -------------------------------------------------

    def _router(self, url: str, sndhwm: int, curve: CurveServer | None = None) -> zmq.Socket:
        sock = new_socket(
            self.ctx,
            zmq.ROUTER,
            sndhwm=sndhwm,
            rcvhwm=BIG_HWM,
            max_message_bytes=self.settings.max_message_bytes + 65536,
            router_mandatory=True,
        )
        if curve is not None:
            curve.secure(sock)
        sock.bind(url)
        endpoints.restrict(url)
        return sock

    def start(self) -> None:
        """Start the zygote and the minimum workers; install signal handlers if on the main thread."""
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        self.fleet.start(self.poller)
        self.poller.register(self.wake_r, zmq.POLLIN)
        self.reconcile(time.monotonic())

    def stop_when_closed(self, fd: int) -> None:
        """Stop at once when `fd` reaches end of file: an embedded broker's parent has died."""
        self.parent_fd = fd
        os.set_blocking(fd, False)
        self.poller.register(fd, zmq.POLLIN)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a graceful drain (SIGINT not in an owned broker: a Ctrl-C is its owner's);
        handlers only enqueue (the wake-up pipe)."""
        signal.set_wakeup_fd(self.wake_w)
        self.signals_installed = True
        for sig in stop_signals():
            signal.signal(sig, lambda *_: None)

    def drain(self, now: float) -> None:
        """Stop accepting; finish in-flight work within `drain_timeout`, then stop."""
        if self.draining_since is None:
            self.draining_since = now
            self.flow.drain()

    def close(self) -> None:
        """Kill every worker and the zygote, close sockets, remove socket files. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        for req in list(self.flow.requests.values()):
            self.flow.finish(req, Code.SHUTTING_DOWN, "the pool stopped before this request finished")
        # The socket files and the run dir's lock go first (the connections stay, for the answers above): the
        # zygote, stopped next, then finds nothing of ours to remove, and waits for no lock of ours to free.
        endpoints.cleanup(self.run_dir, self.frontend_url, self.backend_url, lock=self.run_lock)
        self.fleet.close()
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
        for writer in (self.request_log, self.tracing):  # what they hold is written out, each on its own
            if writer is not None:
                try:
                    writer.close()
                except Exception:  # an exporter's or a disk's failure must not skip the cleanup below
                    log.exception("closing %s failed", type(writer).__name__)

    # ----- the loop -------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                ready = dict(self.poller.poll(max(0.0, min(self.alarm.at, now + 1.0) - now) * 1000))
                now = time.monotonic()
                if self.wake_r in ready:
                    self._on_signal(now)
                if self.parent_fd in ready and not _read_some(self.parent_fd):
                    log.info("the process that owns this pool closed it (or died); stopping")
                    return
                if self.backend in ready:
                    self._read(self.backend, self.on_backend, now)
                if self.frontend in ready:
                    self._read(self.frontend, self.on_frontend, now)
                if self.fleet.zygote.fileno() in ready:
                    self.fleet.on_zygote(now)
                    self.changed = True
                if self.fleet.zygote.outbox:
                    self.fleet.zygote.flush()
                now = time.monotonic()
                self.expire(now)
                self.flow.dispatch(now)  # before reconcile: a retry is sent before its replacement is forked
                if self.changed:
                    self.changed = False
                    self.reconcile(now)
                if self.draining_since is not None and self._drained(now):
                    return
        finally:
            self.close()

    def _on_signal(self, now: float) -> None:
        try:
            os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        log.warning(
            "signal received: draining (finishing in-flight requests for up to %gs)", self.settings.drain_timeout
        )
        self.drain(now)

    def _drained(self, now: float) -> bool:
        return not self.flow.requests or now - self.draining_since > self.settings.drain_timeout  # type: ignore[operator]

    def _read(self, sock: zmq.Socket, handle: Any, now: float) -> None:
        """What waits on `sock`: the first message poll announced, then more while its EVENTS say so
        (no zmq.Again raised to end each round; each EVENTS read costs as much as a receive)."""
        get = sock.get
        for i in range(_BATCH):
            if i and not get(_EVENTS) & _POLLIN:
                return
            try:
                frames = recv_frames(sock)
            except zmq.Again:  # announced, then taken back (a peer's connection dropped meanwhile)
                return
            handle(frames[0], frames[1:], now)

    def on_frontend(self, client: bytes, frames: list[bytes], now: float) -> None:
        flow = self.flow
        self.from_callers += 1
        try:
            kind, header, payload = self.codec.parse(frames)
        except ProtocolError as exc:
            self.stats.rejected[Code.PROTOCOL] += 1
            flow.callers.reply_error(client, 0, Code.PROTOCOL, str(exc))
            return
        if kind == Kind.SUBMIT:
            flow.on_submit(client, header, payload, now)
            self.changed = True
        elif kind == Kind.CANCEL:
            flow.on_cancel(client, header.rid, now)
            self.changed = True
        elif flow.callers.parked(client):  # what it asks would only pile up behind the answers it does not read
            self.stats.rejected[Code.SATURATED] += 1
        elif kind == Kind.PING:
            flow.callers.send(client, self.codec.frames(Kind.RESULT, Ref(header.rid), b""))
        elif kind == Kind.STATS:
            flow.callers.send(
                client, self.codec.frames(Kind.RESULT, Ref(header.rid), self.codec.encode(self.snapshot(now)))
            )
        else:
            self.stats.rejected[Code.PROTOCOL] += 1
            flow.callers.reply_error(
                client, getattr(header, "rid", 0), Code.PROTOCOL, f"{kind.name} is not a client message"
            )

    def on_backend(self, ident: bytes, frames: list[bytes], now: float) -> None:
        try:
            records = self.codec.records(frames)
        except ProtocolError as exc:
            log.warning("dropping a malformed message from worker %r: %s", ident, exc)
            return
        kind, header, payload = records[0]
        if kind == Kind.HEARTBEAT:
            self.fleet.on_heartbeat(header, now)
            return
        self.from_workers += 1
        worker = self.fleet.workers.get(ident)
        if worker is None:
            return  # a killed predecessor's last words
        if kind == Kind.READY:
            self.fleet.on_ready(worker, header, now)
            self.changed = True
            return
        worker.last_beat = now
        if len(records) == 1:
            self._from_worker(worker, kind, header, payload, now)
            return
        callers = self.flow.callers
        callers.gather()  # each caller's share of these records goes to it as one message
        try:
            for kind, header, payload in records:
                if kind in _REQUEST_RECORDS:
                    self._from_worker(worker, kind, header, payload, now)
        finally:
            callers.release()

    def _from_worker(self, worker: Any, kind: Kind, header: Any, payload: bytes, now: float) -> None:
        self.flow.on_worker(worker, kind, header, payload, now)
        if kind not in _STREAM_TRAFFIC:
            self.changed = True

    def expire(self, now: float) -> None:
        """The watchdog pass, by concern; each says when it is next due (at most a second away)."""
        if now < self.alarm.at:
            return
        self.changed = True
        self.alarm.at = min(
            self.fleet.expire_zygote(now),  # a zygote stuck importing
            self.fleet.expire_workers(now),  # startups, heartbeats
            self.flow.expire_running(now),  # stalls, requests' own limits, unconfirmed aborts
            self.flow.expire_queued(now),  # deadlines in the queues, ends of backoff (after the retries above)
            self._housekeeping(now),
        )

    def _housekeeping(self, now: float) -> float:
        """Once a second: parked answers, idle connection records, worker memory."""
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + _HOUSEKEEPING_INTERVAL
            self.flow.callers.resend_parked(now)
            self.flow.connections.prune(now)
            if self.settings.max_memory_per_worker_mb:
                self.fleet.check_memory(now)
        return now + 1.0

    def reconcile(self, now: float) -> None:
        if self.draining_since is None:
            self.fleet.reconcile(now, {name: len(queue) for name, queue in self.flow.queues.items()})

    # ----- stats ----------------------------------------------------------------

    def snapshot(self, now: float) -> Snapshot:
        workers = [
            WorkerSnapshot(
                ident=worker.ident.decode(),
                profile=worker.profile,
                pid=worker.pid,
                state=worker.state.value if not worker.requests else "busy",
                requests=[r.key for r in worker.requests.values()],
                age=round(now - worker.spawned_at, 3),
                served=worker.served,
                rss=_rss(worker.pid) if worker.pid else 0,
                deployment=self.fleet.groups[worker.group][1],
            )
            for worker in sorted(self.fleet.workers.values(), key=lambda w: (w.profile, w.slot))
        ]
        return Snapshot(
            pid=os.getpid(),
            uptime=round(now - self.started, 3),
            frontend=self.frontend_url,
            zygote_pid=self.fleet.zygote.pid,
            queued={name: len(q) for name, q in self.flow.queues.items()},
            in_flight=len(self.flow.requests),
            connections=len(self.flow.connections),
            draining=self.draining_since is not None,
            allow_overrides=self.settings.allow_overrides,
            capacity=self._capacity(),
            workers=workers,
            circuits=self.flow.router.circuit_snapshots(now),
            streams=self.flow.streams(now, STREAMS_SHOWN),
            request_log_lost=self.request_log.lost if self.request_log is not None else 0,
            messages={
                "from_callers": self.from_callers,
                "to_workers": self.flow.to_workers,
                "from_workers": self.from_workers,
                "to_callers": self.flow.callers.sent,
            },
            **self.stats.snapshot(now),
        )

    def _capacity(self) -> dict[str, int]:
        """Streams each profile can carry at once: max_workers x concurrency, over its deployments."""
        capacity: dict[str, int] = dict.fromkeys(self.settings.profiles, 0)
        for name, _, spec in self.fleet.groups.values():
            capacity[name] += spec.max_workers * spec.concurrency
        return capacity


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


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0
