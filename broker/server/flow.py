"""Request flow in the broker: admit, queue, dispatch to free worker slots, retry, answer.

Every request ends in exactly one answer to its caller (`_forward_end`). An unseen request
whose worker was lost, or that the provider failed in a way worth another try, is retried by the
one policy of retrypolicy.py within the call's budget; a stream that breaks after output is
continued where its profile or model opted in (resumes.py), within the same budget. Answers go
out through `Callers` (callers.py), which parks those of a caller that stopped reading.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import heapq
import logging
import math
import random
import time
from typing import Any

import msgspec
import zmq

from .. import routes
from ..config import Limits, Settings
from ..protocol import Code, Codec, Continuation, ErrorInfo, Event, Kind, Ref, Run, Served, StreamSnapshot, Submit
from ..protocol import Error as ErrorHeader
from ..wire.zmqio import NOBLOCK, send_frames
from . import genai, usage
from .callers import Callers, who
from .connections import Connections
from .fairqueue import FairQueue
from .fleet import Fleet
from .requestlog import AttemptLine, RequestLine, RequestLog, content
from .resumes import Rescues
from .retrypolicy import classify, classify_event
from .routing import Move, Router, Same, model_of, rescue, target
from .state import Reason, Request, Worker
from .stats import Stats
from .tracing import Tracing
from .watchdog import Alarm, request_due

log = logging.getLogger(__name__)

_ABORT_GRACE = 5.0  # how long a worker has to confirm an ABORT before it is killed (its neighbours with it)
_LOOKAHEAD = 64  # calls a dispatch sets aside (each waits for a deployment whose circuit is closed) before it stops
# a worker's errors that leave an unseen request as good as unsent: retried like a stall before output
_RETRIED = {Code.PROVIDER_CONNECTION: Reason.CONNECTION, Code.STREAM_INCOMPLETE: Reason.INCOMPLETE}
_BATCH = msgspec.msgpack.Decoder(list[tuple[str, bytes]])


class Flow:
    def __init__(
        self,
        settings: Settings,
        stats: Stats,
        alarm: Alarm,
        codec: Codec,
        fleet: Fleet,
        frontend: zmq.Socket,
        backend: zmq.Socket,
        request_log: RequestLog | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        # the scopes' matching is the same for every request of a model (and the settings never change)
        self._scoped_limits = functools.lru_cache(maxsize=1024)(settings.limits)
        self._routes = functools.lru_cache(maxsize=1024)(functools.partial(_routes, settings))
        self.stats = stats
        self.alarm = alarm
        self.codec = codec
        self.fleet = fleet
        self.backend = backend
        self.queues: dict[str, FairQueue] = {p: FairQueue() for p in settings.profiles}
        self.connections = Connections(
            settings.client_rate,
            settings.client_burst or max(1, int(settings.client_rate)),
            settings.client_queue_limit or settings.queue_limit,
            settings.client_queue_bytes_limit or settings.queue_bytes_limit // 4,
        )
        self.held_bytes = 0  # payloads of the requests in `self.requests`
        self.requests: dict[int, Request] = {}  # by key
        self.backing_off: dict[int, Request] = {}  # retries waiting out their delay, by key: outside the
        # queues, so that a throttled request does not hold up its caller's others behind it
        self.by_client: dict[tuple[bytes, int], Request] = {}
        self.next_key = 1
        self.draining = False
        self.rescues = Rescues(settings)
        self.router = Router(settings)
        self.callers = Callers(frontend, self.connections, codec, settings.client_buffer, self._cut_off)
        self.request_log = request_log
        self.tracing = tracing
        # with message content opted in (traces or the request log): each attempt's answer is kept, bounded
        logged = bool(settings.request_log) and settings.request_log_content
        self.keep_output = logged or (tracing is not None and tracing.content)
        self.to_workers = 0  # messages sent to workers

    # ----- callers --------------------------------------------------------------

    def on_submit(self, client: bytes, sub: Submit, payload: bytes, now: float) -> None:
        hops = None
        try:
            sub = self.settings.bound(sub)
            if sub.fallbacks is not None and sub.profile in self.settings.profiles:  # the caller's own chain
                hops = routes.own_chain(self.settings, sub.profile, sub.fallbacks)
        except ValueError as exc:
            refusal: tuple[Code, str] | None = (Code.BAD_REQUEST, str(exc))
        else:
            refusal = self._refusal(client, sub, payload, now)
        if refusal is not None:
            self.stats.rejected[refusal[0]] += 1
            self.callers.reply_error(client, sub.rid, *refusal)
            return
        fet, stale, deadline = self._limits(sub, sub.profile, sub.model)
        req = Request(self.next_key, client, sub.rid, sub, payload, sub.profile, fet, stale, now + deadline, now)
        chain, req.context = self._routes(sub.profile, sub.model)
        req.hops = hops or list(chain)
        req.used = req.hops[:1]
        if sub.first_event_timeout or sub.stale_timeout or sub.read_timeout:  # the pool's own, only if it set one
            pool_fet, pool_stale, _ = self._scoped_limits(sub.profile, sub.model, Limits())
            if fet < pool_fet:
                req.own_limits.add(Reason.FIRST_EVENT)
            if stale < pool_stale:
                req.own_limits.add(Reason.STALE)
        req.rescue = self.rescues.start(sub, now)
        if self.tracing is not None:
            req.span = self.tracing.request_started(req, now)
        self.next_key += 1
        self.requests[req.key] = req
        self.held_bytes += len(payload)
        self.by_client[(client, sub.rid)] = req
        self.queues[req.profile].push(req)
        self.stats.requests["accepted"] += 1
        self.alarm.by(req.deadline_at)

    def _limits(self, sub: Submit, profile: str, model: str) -> tuple[float, float, float]:
        """(first_event_timeout, stale_timeout, deadline) of a request on one target."""
        fet, stale, deadline = self._scoped_limits(
            profile, model, Limits(sub.first_event_timeout, sub.stale_timeout, sub.deadline)
        )
        if sub.read_timeout:
            fet, stale = min(fet, sub.read_timeout), min(stale, sub.read_timeout)
        return fet, stale, deadline

    def _refusal(self, client: bytes, sub: Submit, payload: bytes, now: float) -> tuple[Code, str] | None:
        if self.draining:
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
        return self.connections.admit(client, now, len(payload))

    def on_cancel(self, client: bytes, crid: int, now: float) -> None:
        req = self.by_client.get((client, crid))
        if req is not None:
            self._cancel(req, "cancelled by the caller", now)

    def _cancel(self, req: Request, why: str, now: float) -> None:
        """End the request for its caller now; a worker running it is told to abort (killed if it does not)."""
        if req.key not in self.requests:  # already ended (while cancelling a vanished caller's others)
            return
        worker = req.worker
        self.finish(req, Code.CANCELLED, why)
        if worker is not None:
            req.cancelled = True
            req.abort_at = now + _ABORT_GRACE
            worker.requests[req.key] = req  # keep the slot busy until the worker confirms
            self._send_worker(worker, self.codec.frames(Kind.ABORT, Ref(req.key)), now)
            self.alarm.by(req.abort_at)

    def _cut_off(self, client: bytes, why: str, now: float) -> None:
        """A caller is gone or stopped reading: end all its requests."""
        for (owner, _), req in list(self.by_client.items()):
            if owner == client:
                self._cancel(req, why, now)

    def drain(self) -> None:
        """Accept no more; what waits in the queues ends now."""
        self.draining = True
        for queue in self.queues.values():
            for req in queue.clear():
                self.finish(req, Code.SHUTTING_DOWN, "the pool is shutting down")

    def fail_queue(self, profile: str, why: str) -> None:
        for req in self.queues[profile].clear() + [r for r in self.backing_off.values() if r.profile == profile]:
            self.finish(req, Code.CONFIG, why)

    # ----- workers --------------------------------------------------------------

    def on_worker(self, worker: Worker, kind: Kind, header: Any, payload: bytes, now: float) -> None:
        """What a worker sent about one of its requests (HEAD, PROGRESS, EVENT, RESULT, ERROR)."""
        req = worker.requests.get(header.rid)
        if req is None:
            return
        if kind == Kind.USAGE:  # billed even when cancelled: the provider consumed it all the same
            self.stats.tokens.spent(req, header)
            return
        if req.cancelled:
            if kind in (Kind.RESULT, Kind.ERROR):
                self.fleet.release(worker, req, now)
            return
        if kind == Kind.EVENT:
            self._on_event(req, header, payload, now)
        elif kind == Kind.PROGRESS:
            self._progress(req, now)
        elif kind == Kind.ENDING:  # the stream said it finished: its end follows within the worker's grace
            req.ending = True
            self._progress(req, now)
        elif kind == Kind.HEAD:
            if req.delivered and req.rescue is not None:  # a continuation's: the caller has its head
                req.rescue.started(payload)
            else:
                req.head = payload
            req.headers_at = now
        elif kind == Kind.RESULT and req.held is None:
            self.fleet.release(worker, req, now)
            if req.output is not None:
                req.output.add(payload)
            self.router.answered(req, now)
            self.stats.latency.add(now - req.accepted_at)
            if how := rescue(req):
                self.stats.rescued[how] += 1
            if req.rescue is not None and req.rescue.strategy:
                self.stats.continuations[f"{req.rescue.strategy}:ok"] += 1
            served = Served(req.crid, *self.router.served(req))
            self._forward_end(req, self.codec.frames(Kind.RESULT, served, payload or req.head or b""), "ok")
        elif kind in (Kind.ERROR, Kind.RESULT):  # an ERROR, or the RESULT of a stream ended by its error event
            self.fleet.release(worker, req, now)
            code = header.code if kind == Kind.ERROR else Code.PROVIDER_STREAM
            if kind == Kind.RESULT and req.held is not None:
                req.held_end, payload = payload, self._event_error(req.held)
            reason, after, failure = self._retried_for(code, payload)
            if reason is None and (failure or code in (Continuation.PREFILL_REFUSED, Continuation.REPLAY_DIVERGED)):
                self.router.answered(req, now)  # the provider works; it refused this request (or its prefill)
            if req.delivered and req.rescue is not None:  # a broken stream opted in to be continued
                if reason is not None:
                    self.retry_or_fail(req, reason, now, payload, code, after)
                else:
                    req.history.append(code)
                    self._after_output(req, code, now, self._error_info(code, payload))
                return
            if (reason is not None or failure) and not req.delivered:
                self.retry_or_fail(req, reason, now, payload, code, after, failure)
                return
            self._forward_error(req, code, payload)

    def _retried_for(self, code: str, payload: bytes) -> tuple[Reason | None, float | None, str]:
        """Whether a worker's error is retried (the reason, or None), the wait the provider asked for,
        and, for a provider's refusal, what it was (`context_length`, `content_filter`, `status:NNN`)."""
        if code not in (Code.PROVIDER_STATUS, Code.PROVIDER_STREAM):
            return _RETRIED.get(code), None, ""
        try:
            info = self.codec.error(payload)
        except ValueError:  # msgspec's decode errors are ValueErrors
            return None, None, ""
        if code == Code.PROVIDER_STREAM:  # an error event: overloaded_error, api_error are retried, others never
            return classify_event(info.body), None, ""
        reason, after = classify(info.status or 0, info.headers)
        return reason, after, "" if reason else info.failure or f"status:{info.status}"

    def _event_error(self, held: bytes) -> bytes:
        """The error of a stream that ended in the provider's error event (`held`), as a worker that
        raised at it would have sent it."""
        data = _BATCH.decode(held)[0][1]
        info = ErrorInfo(Code.PROVIDER_STREAM, f"error event mid-stream: {data.decode(errors='replace')}", body=data)
        return self.codec.encode(info)

    def _error_info(self, code: str, payload: bytes) -> ErrorInfo:
        try:
            return self.codec.error(payload)
        except ValueError:  # msgspec's decode errors are ValueErrors
            return ErrorInfo(code, "the worker's error could not be read")

    def _on_event(self, req: Request, event: Event, data: bytes, now: float) -> None:
        if event.error:  # the provider's error event: the caller gets it only if the call ends with it
            req.held = data
            return
        if req.attempt_span is not None and req.last_event_at is not None and req.submit.stream:
            self.tracing.chunk(req, now)  # type: ignore[union-attr]
        if req.output is not None:
            req.output.add(data)
        self._progress(req, now)
        self._deliver(req, event.count, data)

    def _deliver(self, req: Request, count: int, data: bytes) -> None:
        """Forward a batch of `count` events to the caller (its head first, with the first)."""
        if req.head is not None:
            served = Served(req.crid, *self.router.served(req))
            if not self.callers.send(req.client, self.codec.frames(Kind.HEAD, served, req.head)):
                return
            req.head = None
        numbered = Event(req.crid, req.delivered + 1, count)  # a continuation's follow those delivered
        if self.callers.send(req.client, self.codec.frames(Kind.EVENT, numbered, data)):
            req.delivered += count
            self.stats.events += count
            if req.rescue is not None:
                req.rescue.keep(data)

    def streams(self, now: float, most: int) -> list[StreamSnapshot]:
        """The `most` oldest requests in flight, for `isopool top`."""
        return [
            StreamSnapshot(
                request=req.key,
                profile=req.profile,
                model=req.model or req.submit.model,
                worker=req.worker.ident.decode() if req.worker is not None and not req.queued else "",
                attempt=req.attempt,
                age=round(now - req.accepted_at, 2),
                since_event=None if req.last_event_at is None else round(now - req.last_event_at, 2),
                delivered=req.delivered,
            )
            for req in heapq.nsmallest(most, self.requests.values(), key=lambda r: r.accepted_at)
        ]

    def _progress(self, req: Request, now: float) -> None:
        """A real event arrived: restart the stale clock (the first one switches from first_event_timeout)."""
        if req.last_event_at is None:
            self.router.answered(req, now)
            self.stats.first_event.add(now - req.sent_at)
            req.first_event_at = now
            self.alarm.by(now + req.stale_timeout)
        req.last_event_at = now

    # ----- dispatch and retries -------------------------------------------------

    def dispatch(self, now: float) -> None:
        """Queued requests to free worker slots, each on the deployment the router picks."""
        detoured = False
        for name, queue in self.queues.items():
            waiting: list[Request] = []  # for a busy deployment whose circuit is closed: those behind go on
            while queue and len(waiting) < _LOOKAHEAD:
                free = [g for g in self.router.of_profile[name] if self.fleet.has_free(g)]
                req = queue.pop(now) if free else None
                if req is None:  # no free slot, or only retries waiting out their backoff
                    break
                group = self.router.pick(name, free, self.fleet.load, now, model_of(req), frozenset(req.failed_on))
                if group is None:  # every free deployment's circuit is open
                    detour = self.router.detour(req, free, now)
                    if detour is None:
                        waiting.append(req)
                        continue
                    if isinstance(detour, Move):
                        self._move(req, detour, now, "its circuits are open")
                        detoured = True
                        continue
                    group = detour
                worker = self.fleet.take(group)
                self._run(worker, req, now)
                self.fleet.offer(worker)
            for req in reversed(waiting):
                if req.key in self.requests:  # not ended meanwhile (a caller cut off by a failed send)
                    queue.push(req, front=True)
        if detoured:  # a queue already passed may have received them
            self.dispatch(now)

    def _run(self, worker: Worker, req: Request, now: float) -> None:
        req.attempt += 1
        req.target_attempts += 1
        req.worker = worker
        req.group = worker.group
        req.sent_at = now
        req.first_event_at = None
        req.ending = False
        req.spent = None
        req.output = genai.Output() if self.keep_output else None
        self.router.sent(req, now)
        # a circuit's probe is told quickly whether a silent upstream answers again (its caller still
        # has its fallbacks), rather than waiting out the whole headers_timeout
        probe = self.settings.circuit_probe_timeout if req.probing else math.inf
        req.headers_timeout = min(self.settings.headers_timeout, req.first_event_timeout, probe)
        worker.requests[req.key] = req
        payload = req.rescue.payload(req.payload) if req.rescue is not None and req.delivered else req.payload
        traceparent = ""
        if self.tracing is not None:
            req.attempt_span, traceparent = self.tracing.attempt_started(req, now)
        run = Run(req.key, req.attempt, req.model, traceparent)
        if self._send_worker(worker, self.codec.frames(Kind.RUN, run, payload), now):
            self.alarm.by(request_due(req)[0])

    def retry_or_fail(
        self,
        req: Request,
        reason: Reason | None,
        now: float,
        last_error: bytes = b"",
        code: str = "",
        after: float | None = None,
        failure: str = "",
    ) -> None:
        """After a failed attempt, what the router decides (routing.py): the same target again after a
        delay, another target of the call's chain, or the end: with the provider's own error (the first
        of the call's own target, `last_error` of `code` for a refusal) where there is one, else the pool's.
        `reason` None: the provider refused the request (`failure` says how)."""
        if reason is not None:
            self.router.failed(req, reason, after, now)
        before = list(req.history)
        req.history.append(reason or failure)
        self._attempt_ended(req, reason or failure, now, reason)
        req.tries.append(f"{req.group or req.profile}:{reason or failure}")
        if reason is not None and reason.is_stall:
            self.stats.stalls[reason] += 1
        if req.span is not None and reason is not None:
            self.tracing.attempt_failed(req, reason, now)  # type: ignore[union-attr]
        if last_error and req.first_error is None and len(req.used) == 1:
            req.first_error = (code, last_error, self.router.served(req))
        if reason is Reason.DEADLINE or now >= req.deadline_at:
            self.finish(req, Code.DEADLINE, f"deadline of the request passed after {req.attempt} attempt(s)")
            return
        if req.delivered and req.rescue is not None and reason is not None:
            lost = Code.STALLED if reason.is_stall else Code.WORKER_LOST
            message = f"{reason} after {req.delivered} event(s) were delivered"
            info = self._error_info(code, last_error) if last_error else ErrorInfo(lost, message)
            self._after_output(req, reason, now, info, after)
            return
        decision = self.router.next(req, reason, failure, before, after, now, random.random())
        if isinstance(decision, Move):
            self._move(req, decision, now, f"attempt {req.attempt} failed")
        elif isinstance(decision, Same):
            log.info("request %d: attempt %d failed (%s); retrying in %.2fs", req.key, req.attempt, reason,
                     decision.delay)  # fmt: skip
            self.stats.retries += 1
            self.stats.retries_by[reason or failure] += 1
            self.stats.note(now, "retry", f"request {req.key}: attempt {req.attempt} {reason or failure}, "
                                          f"again in {decision.delay:.1f}s")  # fmt: skip
            if req.span is not None:
                self.tracing.event(req.span, "retry queued", now, after=str(reason or failure),  # type: ignore[union-attr]
                                   delay=decision.delay)  # fmt: skip
            req.head = None
            self._requeue(req, decision.delay, now)
        elif decision.code is not None:
            self.finish(req, decision.code, decision.why)
        elif error := (decision.first and len(req.used) > 1 and req.first_error) or (
            last_error and (code, last_error, self.router.served(req))
        ):
            log.info("request %d: attempt %d failed (%s); not retried: %s", req.key, req.attempt, reason or failure,
                     decision.why)  # fmt: skip
            code, payload, (_, *where) = error  # the provider's own error is the most useful answer, said where from
            self._forward_error(req, code, payload, (req.attempt, *where))
        else:
            tried = ", ".join(req.tries)
            self.finish(
                req, Code.ATTEMPTS_EXHAUSTED, f"gave up after {req.attempt} attempt(s) ({decision.why}): {tried}"
            )

    def _move(self, req: Request, move: Move, now: float, why: str) -> None:
        """On to another target of the call's chain: its profile's queue, its model and time limits
        (the deadline stays the call's)."""
        was = target(req)
        req.profile, req.model = move.hop
        req.used.append(move.hop)
        req.target_attempts = 0
        req.rerouted = move.rescue
        req.first_event_timeout, req.stale_timeout, _ = self._limits(
            req.submit, req.profile, req.model or req.submit.model
        )
        self.stats.moved(was, target(req))
        self.stats.note(now, "fallback", f"request {req.key}: {was} > {target(req)} ({move.rescue})")
        if req.span is not None:
            self.tracing.event(req.span, "fallback", now, to=target(req), why=move.rescue)  # type: ignore[union-attr]
        log.info("request %d: %s; %s to %r", req.key, why, move.rescue, target(req))  # %r: a caller names the model
        req.head = None
        self._requeue(req, 0.0, now)

    def _after_output(
        self, req: Request, failure: str, now: float, info: ErrorInfo, after: float | None = None
    ) -> None:
        """A stream opted in to be continued failed after output with `failure` (a Reason, or a worker's
        code about a continuation; `info` says what): continue it within the call's budget and deadline,
        else end it with the error it first broke with and why it was not continued."""
        rescue = req.rescue
        assert rescue is not None
        if rescue.first is None and req.held is not None:  # it broke with the provider's error event
            rescue.event = (req.held, req.held_end)
        if failure == Continuation.NOT_CONTINUABLE:
            req.attempt -= 1  # the worker sent nothing upstream: not an attempt
        if tally := rescue.tally(failure):
            self.stats.continuations[tally] += 1
        delay, why = None, ""
        if strategies := self.rescues.after(rescue, req.profile, req.submit.model, failure, info, now):
            reason = failure if isinstance(failure, Reason) else Reason.INCOMPLETE  # a refused prefill: at once
            left = req.deadline_at - now
            delay, why = self.router.policy.next_delay(
                reason, req.attempt, req.history[:-1], left, after, random.random(), req.submit.max_attempts
            )
        if delay is None:
            if req.held is None and rescue.event is not None:  # the caller gets that event, as without this option
                req.held, req.held_end = rescue.event
            answer = rescue.answer(req.delivered, req.attempt, why)
            log.info("request %d: broke after output (%s); not continued: %s", req.key, failure, answer.rescue)
            self._forward_error(req, answer.code, self.codec.encode(answer))
            return
        log.info("request %d: broke after %d event(s) (%s); continuing (%s) in %.2fs", req.key, req.delivered,
                 failure, "/".join(strategies), delay)  # fmt: skip
        self._requeue(req, delay, now)

    def _requeue(self, req: Request, delay: float, now: float) -> None:
        """Run the request again after `delay` (from the front of its caller's queue)."""
        req.held = req.held_end = None  # the error event that ended the last attempt is never forwarded
        req.headers_at = None
        req.last_event_at = None
        req.not_before = now + delay
        if delay > 0:
            self.backing_off[req.key] = req
            self.alarm.by(req.not_before)
        else:
            self.queues[req.profile].push(req, front=True)

    def _shed(self, worker: Worker, req: Request, reason: Reason, now: float) -> None:
        """Take one stream off a worker that carries others, when a limit of the request's own
        (its deadline, or a time limit tighter than the pool's) passed: the worker is told to
        abort it (and killed if it does not), the request is retried or ended like a killed one,
        and the neighbours go on. A caller's short limit never kills another caller's stream."""
        log.info("request %d on worker %s: %s (its own limit)", req.key, worker.ident.decode(), reason)
        tombstone = dataclasses.replace(req, cancelled=True, abort_at=now + _ABORT_GRACE)
        worker.requests[req.key] = tombstone  # the slot stays busy until the worker confirms
        self._send_worker(worker, self.codec.frames(Kind.ABORT, Ref(req.key)), now)
        req.worker = None
        del self.requests[req.key]  # a retry runs under a new key: the old one is the worker's until it confirms
        req.key, self.next_key = self.next_key, self.next_key + 1
        self.requests[req.key] = req
        self.retry_or_fail(req, reason, now)

    # ----- the watchdog's share: each returns when it is next due ----------------

    def expire_running(self, now: float) -> float:
        """Running requests past a limit: a stall kills its worker (its unseen requests retried), a
        request's own limit sheds it alone, an ABORT not confirmed in time kills the worker."""
        due = now + 1.0
        for worker in list(self.fleet.workers.values()):
            for req in list(worker.requests.values()):
                if req.cancelled:
                    if now >= req.abort_at:
                        self.fleet.kill(worker, Reason.ABORT, now)
                        break
                    due = min(due, req.abort_at)
                    continue
                req_at, reason = request_due(req)
                if now >= req_at and reason in req.own_limits and len(worker.requests) > 1:
                    self._shed(worker, req, reason, now)  # its own limit: the neighbours' streams are healthy
                    due = min(due, now + _ABORT_GRACE)
                elif now >= req_at:
                    if reason in (Reason.HEADERS, Reason.FIRST_EVENT) and self._unheard(worker, now):
                        reason = Reason.HEARTBEAT  # the worker went silent, not the provider: not its one retry
                    log.info("request %d on worker %s: %s", req.key, worker.ident.decode(), reason)
                    self.fleet.kill(worker, reason, now, req)
                    break
                due = min(due, req_at)
        return due

    def expire_queued(self, now: float) -> float:
        """Queued requests whose deadline passed end; a retry whose delay is over goes to the front of
        its caller's queue."""
        due = now + 1.0
        for req in list(self.backing_off.values()):
            if now >= req.not_before:
                del self.backing_off[req.key]
                self.queues[req.profile].push(req, front=True)
            else:
                due = min(due, req.not_before)
        for queue in self.queues.values():
            for req in [r for r in queue if now >= r.deadline_at]:
                queue.remove(req)
                self.finish(req, Code.DEADLINE, "deadline passed while the request was queued")
            due = min(due, queue.next_due(now))
        return due

    def _unheard(self, worker: Worker, now: float) -> bool:
        """Whether a worker missed its last two heartbeats (a hung worker, whose request's silence
        says nothing about the provider)."""
        return now - worker.last_beat > 2 * self.settings.heartbeat_interval

    # ----- answers --------------------------------------------------------------

    def finish(self, req: Request, code: Code, message: str) -> None:
        """End a request with a broker-made error (exactly one answer)."""
        info = ErrorInfo(code, message, delivered=req.delivered, attempts=req.attempt, tried=req.tries)
        frames = self.codec.frames(
            Kind.ERROR, ErrorHeader(req.crid, code, *self.router.served(req)), self.codec.encode(info)
        )
        self._forward_end(req, frames, "cancelled" if code == Code.CANCELLED else f"error:{code}")

    def _forward_error(self, req: Request, code: str, payload: bytes, served: tuple | None = None) -> None:
        """End a request with a worker's error (a provider's), saying where it ran (`served`: where that
        error came from, if not the latest attempt)."""
        header = ErrorHeader(req.crid, code, *(served or self.router.served(req)))
        self._forward_end(req, self.codec.frames(Kind.ERROR, header, payload), f"error:{code}")

    def _forward_end(self, req: Request, frames: list[bytes], outcome: str) -> None:
        """Send a live request's one answer and count its outcome; nothing for one already ended."""
        if self.requests.pop(req.key, None) is None:
            return
        if req.held is not None:  # it ends with its last attempt's error event, which the caller gets now
            self._deliver(req, 1, req.held)
            if req.held_end is not None:  # then that stream's end, as its worker sent it
                frames, outcome = self.codec.frames(Kind.RESULT, Served(req.crid, *self.router.served(req)),
                                                    req.held_end), "ok"  # fmt: skip
        self.router.dropped(req)
        self.stats.requests[outcome] += 1
        self.held_bytes -= len(req.payload)
        self.by_client.pop((req.client, req.crid), None)
        self.connections.done(req.client, len(req.payload))
        if req.queued:
            self.queues[req.profile].remove(req)
        elif req.worker is not None:
            req.worker.requests.pop(req.key, None)
        self.backing_off.pop(req.key, None)
        self.callers.send(req.client, frames)
        if self.request_log is not None or req.span is not None:
            now = time.monotonic()
            self._attempt_ended(req, outcome, now)
            if self.request_log is not None:
                self._log(req, outcome, now)
            if req.span is not None:
                self.tracing.request_ended(req.span, outcome, req.attempt, now)  # type: ignore[union-attr]

    def _attempt_ended(self, req: Request, outcome: str, now: float, reason: Reason | None = None) -> None:
        """Tell the request log and the traces how the current attempt went (once: a kill and its error
        may both say it)."""
        if req.attempt <= req.attempts_told or not req.attempt:
            return
        req.attempts_told = req.attempt
        if self.request_log is not None:
            first = None if req.first_event_at is None else round(req.first_event_at - req.sent_at, 3)
            req.attempts.append(AttemptLine(req.group or req.profile, req.model or req.submit.model,
                                            round(req.sent_at - req.accepted_at, 3), first, round(now - req.sent_at, 3),
                                            outcome, self.stats.tokens.attempt(req)))  # fmt: skip
        if req.attempt_span is not None:
            self.tracing.attempt_ended(req, outcome, reason, now)  # type: ignore[union-attr]
            req.attempt_span = None

    def _log(self, req: Request, outcome: str, now: float) -> None:
        self.request_log.write(RequestLine(  # type: ignore[union-attr]
            time=datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            request=req.key,
            client=who(req.client),
            profile=req.submit.profile,
            model=req.submit.model,
            answered_by=target(req),
            status=outcome,
            attempts=req.attempts,
            delivered=req.delivered,
            took=round(now - req.accepted_at, 3),
            usage=usage.total([a.usage for a in req.attempts]),
            caller=req.submit.caller,
            content=content(req) if self.settings.request_log_content else None,
        ))  # fmt: skip

    def _send_worker(self, worker: Worker, frames: list[bytes], now: float) -> bool:
        try:
            send_frames(self.backend, [worker.ident, *frames], NOBLOCK)
            self.to_workers += 1
            return True
        except zmq.ZMQError:
            self.fleet.kill(worker, Reason.CRASH, now)
            return False


def _routes(settings: Settings, profile: str, model: str) -> tuple[tuple[routes.Hop, ...], routes.Hop | None]:
    """A model's configured chain and context fallback on a profile (the same for every request of it)."""
    return tuple(routes.chain(settings, profile, model)), routes.context_hop(settings, profile, model)
