"""A provider worker: one process, one fresh SDK client, requests run as asyncio tasks.

It connects a DEALER to the broker's backend, says READY, and runs what it is sent.
A separate thread heart-beats on its own socket so that a hung interpreter (no
heartbeats) is told apart from a stalled stream (heartbeats, no events), and exits
the process as soon as the broker's liveness pipe closes: no orphans, ever.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import math
import os
import select
import ssl
import threading
import time
from typing import Any

import msgspec
import zmq

from broker.config import FAMILIES, Profile
from broker.protocol import (
    KIND_BYTES,
    PROTOCOL_VERSION,
    Call,
    Code,
    Codec,
    ErrorInfo,
    Event,
    Heartbeat,
    HttpCall,
    Kind,
    ProtocolError,
    Ready,
    Ref,
    Response,
    Resume,
    TimedCall,
)
from broker.protocol import Error as ErrorHeader
from broker.wire.loopsock import LoopSocket
from broker.wire.zmqio import BIG_HWM, new_socket

from . import clouds, sdks, stacks
from .aio import Session
from .calls import STREAMABLE, BadCall, resolve, run_call
from .errors import translate
from .exchange import run_http, signed
from .fallback import retarget
from .pipe import WorkerSpec
from .resume import run_resume
from .timing import TimedTransport, run_timed
from .traced import traced
from .usage import Facts
from .warmup import warm_up, warm_worker

log = logging.getLogger(__name__)


_ssl_context: ssl.SSLContext | None = None
WARM_AFTER = 0.05  # seconds a worker spawned warm (WorkerSpec.warm) waits idle before its warm-up


# Modules the SDKs and their HTTP stack import lazily on a first request; importing them in the
# zygote saves every fresh worker tens of milliseconds of CPU (seconds when many start at once).
_LAZY_MODULES = (
    "anyio._backends._asyncio",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "concurrent.futures.thread",
    "opentelemetry.propagate",
    "opentelemetry.trace.propagation.tracecontext",
)


def preload(kinds: tuple[str, ...]) -> None:
    """Run in the zygote before forking: what every worker of these SDK kinds would otherwise do on its own.

    Builds the TLS trust store once (~50 ms): a TLS context is plain memory, so sharing it
    copy-on-write keeps every worker's HTTP client fresh while making it ready in ms. Then
    imports the SDKs and what they load lazily, by resolving every streamable method on
    throwaway clients (which open no connection and are dropped before any fork), and runs
    a first call of each SDK against a provider on a Unix socket of its own (worker/warmup.py). And builds a
    message Codec once: msgspec works out each message type's layout on first use, ~3.5 ms (mostly
    copy-on-write faults) of a forked worker's start before READY otherwise."""
    global _ssl_context
    Codec()
    families = tuple(sorted({FAMILIES[kind] for kind in kinds}))  # the SDKs the profiles' kinds run on
    libraries = [sdks.load(family).http for family in families]  # a TLS context suits httpx and httpx2 alike
    if _ssl_context is None and libraries:
        _ssl_context = libraries[0].create_ssl_context()
    for name in _LAZY_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    clouds.preload(kinds)
    for kind in families:
        clients = build_client(Profile(kind=kind), api_key="warm-up")
        for sdk_kind, method in STREAMABLE:
            if sdk_kind == kind:
                try:
                    resource, name = resolve(clients.sdk, method, clients.resource_type)
                except BadCall:  # an endpoint the installed SDK predates (openai < 1.66 has no `responses`)
                    continue
                getattr(resource.with_streaming_response, name)
    warm_up(families, _ssl_context)


# The key of a client built without one of the pool's own. It never leaves the worker: only calls
# that bring their own key run on such a client (an SDK needs a key to be built at all).
STAND_IN_KEY = "isopool-worker-has-no-key"


class Clients(msgspec.Struct, frozen=True):
    """A worker's fresh SDK client, the HTTP client under it, the SDK's resource base class, and,
    when the pool has no credentials of its own, why not (raised for every call that needs them)."""

    sdk: Any
    http: Any
    resource_type: type
    no_key: Any = None  # the SDK's own error, e.g. openai's "Missing credentials ... OPENAI_API_KEY"


def build_client(profile: Profile, api_key: str | None = None) -> Clients:
    """A fresh async SDK client for the profile, with the pool's key from the environment, or
    without one (a stand-in) when the SDK refuses to be built for want of it."""
    named = profile.api_key_env
    key = api_key or (os.environ.get(named) if named else None)
    sdk = sdks.load(profile.family)
    if not key and named and profile.kind == profile.family:
        # not the SDK's own variable in its place (OPENAI_API_KEY, say): that key is for another upstream
        return _keyless(sdk, profile, sdk.error(f"{named} (the profile's api_key_env) is not set in the pool's "
                                                "environment: set it, then start the pool again"))  # fmt: skip
    try:
        clients = _clients(sdk, profile, key)
    except sdk.error as exc:
        return _keyless(sdk, profile, exc)
    if profile.kind == "anthropic" and _unauthenticated(clients.sdk):  # first-party; the clouds sign otherwise
        return _keyless(sdk, profile, sdk.error("no API key: the pool's environment has no ANTHROPIC_API_KEY (nor "
                                                "ANTHROPIC_AUTH_TOKEN) and the profile names no api_key_env: set "
                                                "one, then start the pool again"))  # fmt: skip
    return clients


def _keyless(sdk: sdks.Sdk, profile: Profile, why: Exception) -> Clients:
    """Clients on the stand-in key, for the calls that bring their own; every other call raises `why`."""
    return msgspec.structs.replace(_clients(sdk, profile, STAND_IN_KEY), no_key=why)


def _unauthenticated(client: Any) -> bool:
    """An Anthropic client with no credentials and no key header (its api_key's or auth_token's, the profile's
    default_headers, ANTHROPIC_CUSTOM_HEADERS), which refuses every call as if the caller had erred (a
    TypeError). The OpenAI SDK refuses to build one instead."""
    if getattr(client, "_token_cache", None) is not None:  # credentials (a profile, federation) add one per request
        return False
    return not {name.lower() for name in client.default_headers} & {"x-api-key", "authorization"}


def _clients(sdk: sdks.Sdk, profile: Profile, key: str | None) -> Clients:
    http_client = sdk.module.DefaultAsyncHttpxClient(verify=_ssl_context or True)
    client = clouds.build(
        sdk,
        profile,
        key,
        http_client=http_client,
        timeout=profile.sdk_timeout,
        max_retries=0,  # the broker retries, within each call's one budget (broker/server/retrypolicy.py)
        default_headers=profile.default_headers or None,
    )
    return Clients(client, http_client, sdk.resource_type)


def brings_own_key(call: Call | HttpCall | TimedCall) -> bool:
    http = call.http if isinstance(call, TimedCall) else call
    return isinstance(http, HttpCall) and bool(http.api_key)


class Emitter:
    """Sends what one request produces, in order, tagged with its request id. The sends
    do not wait (the broker reads as fast as it can); the methods are coroutines so that
    the call runners need not know.

    With a `window` (seconds), what the request produces within it shares one message (records, in the
    provider's order: broker/protocol.py): each message costs the worker ~45 µs and the broker ~20 µs per
    hop, a poll wake-up in each process, and a provider writes each token on its own. Events go out at once
    when none went out in the last `window` (so the first one, and any after a pause, are never delayed),
    with whatever waited for them (the head); otherwise they are held, with those that follow, until the
    window since that send has passed; progress (a stream assembled for a non-streaming call read on) goes
    the same way. The head, usage and the stream's ending wait at most the window (the head for the first
    events, the rest for the end); the end (RESULT, ERROR) sends everything
    at once. A timer sends what is held when the window passes: a stream that pauses does not keep it. The
    broker's clocks see any record at most `window` late: a small fraction of any stale_timeout
    (config.MAX_COALESCE_MS). Without a window each record is its own message, sent at once."""

    def __init__(self, sock: LoopSocket, codec: Codec, rid: int, window: float = 0.0) -> None:
        self._sock, self._codec, self._rid = sock, codec, rid
        self._seq = 0
        self._ref = codec.encode(Ref(rid))
        self._window = window
        self._out: list[bytes] = []  # the records held, in order, three frames each
        self._held: list[tuple[str, bytes]] = []  # events held, after `_out`: the batch still open
        self._report: list[bytes] | None = None  # the latest USAGE while events are held: it goes after them
        self._timer: asyncio.TimerHandle | None = None
        self._sent_at = -math.inf  # when events last went out (time.monotonic)
        self._eventful = False  # whether `_out` holds events

    async def head(self, response: Response) -> None:
        self._hold([KIND_BYTES[Kind.HEAD], self._ref, self._codec.encode(response)])

    async def events(self, batch: list[tuple[str, bytes]]) -> None:
        self._held += batch
        self._pace()

    def _pace(self) -> None:
        """Send at once if no events went out in the last window, else when it has passed."""
        if not self._window or (now := time.monotonic()) - self._sent_at >= self._window:
            self.flush()
        else:
            self._due(self._sent_at + self._window - now)

    def flush(self) -> None:
        """Send what is held, as one message (the window passed, or the end came)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_batch()
        if self._out:
            frames, self._out = self._out, []
            self._sock.send(frames)
        if self._eventful:
            self._sent_at, self._eventful = time.monotonic(), False

    def send_events(self, batch: list[tuple[str, bytes]], error: bool = False) -> None:
        """Send a batch now (a timed call's ticks), after what is held."""
        self._close_batch()  # the events before it are numbered first
        self._end(self._events(batch, error))

    def _events(self, batch: list[tuple[str, bytes]], error: bool = False) -> list[bytes]:
        header = self._codec.encode(Event(self._rid, self._seq + 1, len(batch), error))
        self._seq += len(batch)
        self._eventful = True
        return [KIND_BYTES[Kind.EVENT], header, self._codec.encode(batch)]

    def _close_batch(self) -> None:
        """The events held, then the usage that waited for them, become records in order."""
        if self._held:
            batch, self._held = self._held, []
            self._out += self._events(batch)
        if self._report is not None:
            self._out += self._report
            self._report = None

    def _hold(self, record: list[bytes]) -> None:
        """A record that may wait, the window at most, for others to go with."""
        self._close_batch()
        self._out += record
        self._due(self._window)

    def _due(self, delay: float) -> None:
        """Send what is held within `delay` seconds (at once without a window)."""
        if not self._window:
            self.flush()
            return
        loop = asyncio.get_running_loop()
        if self._timer is None or self._timer.when() > loop.time() + delay:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_later(delay, self.flush)

    def _end(self, record: list[bytes]) -> None:
        """A record that goes at once, with everything held before it."""
        self._close_batch()
        self._out += record
        self.flush()

    async def error_event(self, event: tuple[str, bytes]) -> None:
        """The provider's mid-stream error event: the broker forwards it only if the call ends with it."""
        self._close_batch()  # the events before it are numbered first
        self._hold(self._events([event], error=True))

    async def progress(self) -> None:
        """A stream assembled for a non-streaming call read on: paced as its events would be (held, a slow
        stream's every token woke the worker twice: its read, then the timer)."""
        self._close_batch()
        self._out += [KIND_BYTES[Kind.PROGRESS], self._ref, b""]
        self._eventful = True
        self._pace()

    async def ending(self) -> None:
        """The stream sent its terminal event: the broker stops watching it for staleness (its `[DONE]`
        or close is the worker's to wait for, a GRACE at most)."""
        self._hold([KIND_BYTES[Kind.ENDING], self._ref, b""])

    async def usage(self, facts: Facts) -> None:
        """What the provider reported of the answer so far (its usage, id, model, finish reasons). While events
        are held it waits for them, the latest report replacing the one before (the counts add up): a server
        that reports usage in every chunk (vLLM's continuous_usage_stats) must not undo the coalescing."""
        record = self._codec.frames(Kind.USAGE, facts.spent(self._rid), b"")
        if self._held:
            self._report = record
        else:
            self._hold(record)

    async def result(self, response: Response | None) -> None:
        payload = b"" if response is None else self._codec.encode(response)
        self._end([KIND_BYTES[Kind.RESULT], self._ref, payload])

    async def error(self, info: ErrorInfo) -> None:
        header = self._codec.encode(ErrorHeader(self._rid, info.code))
        self._end([KIND_BYTES[Kind.ERROR], header, self._codec.encode(info)])


def _read_call(codec: Codec, payload: bytes) -> Call | HttpCall | TimedCall | Resume:
    """The call a RUN carries; one a caller encoded with the wrong types (a low-level client given bytes for
    a header value) is its bad request, not the pool's internal error."""
    try:
        return codec.call(payload)
    except msgspec.DecodeError as exc:  # msgspec's ValidationError is one
        raise BadCall(
            f"the call could not be read ({exc}): an HttpCall's method, path, header names and values are str, "
            "its body bytes"
        ) from None


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.codec = Codec()
        self.tasks: dict[int, asyncio.Task] = {}
        self.clients: Clients | None = None
        self.client_error: Exception | None = None
        self.http = Session(_ssl_context, spec.profile.family)  # relayed and timed calls
        self.timed = TimedTransport(self.http)
        self.placed: dict[tuple[tuple[str, str], ...], Clients] = {}  # clients moved to a call's placement
        try:
            self.clients = build_client(spec.profile)
        except Exception as exc:  # every request gets this error
            self.client_error = exc

    async def run(self) -> None:
        ctx = zmq.Context()
        sock = new_socket(ctx, zmq.DEALER, identity=self.spec.ident.encode(), sndhwm=BIG_HWM)
        sock.connect(self.spec.backend)
        self.sock = LoopSocket(sock, self._on_message)
        ready = Ready(self.spec.ident, os.getpid(), PROTOCOL_VERSION, self.spec.profile.concurrency, self.spec.token)
        self.sock.send(self.codec.frames(Kind.READY, ready))
        # after READY: a thread's start waits for the thread to run (1-3 ms on a busy machine), off the respawn's path
        threading.Thread(target=self._heartbeat, args=(ctx,), daemon=True).start()
        self.sock.attach(asyncio.get_running_loop())
        warming = asyncio.create_task(self._warm_if_idle()) if self.spec.warm else None
        try:
            await asyncio.Event().wait()  # runs until the broker goes (the heartbeat thread then exits the process)
        finally:  # or until the loop is interrupted (Ctrl-C): the pool's connections closed, not dropped
            if warming is not None:
                warming.cancel()
            await self.http.close()

    async def _warm_if_idle(self) -> None:
        """A replacement of a worker killed with requests, still idle WARM_AFTER after READY (a spare, where the
        next stall's retry goes), pays its first call's page copies now (worker/warmup.py). One given requests at
        once (a burst of kills, an overloaded machine) is warmed by them, and adds no CPU to theirs."""
        await asyncio.sleep(WARM_AFTER)
        if not self.tasks:
            await warm_worker(self.spec.profile.family, _ssl_context)

    def _on_message(self, frames: list[bytes]) -> None:
        try:
            kind, header, payload = self.codec.parse(frames)
        except ProtocolError as exc:
            log.error("dropping a malformed message from the broker: %s", exc)
            return
        if kind == Kind.RUN:
            self.tasks[header.rid] = asyncio.create_task(self._execute(header.rid, payload, header.model,
                                                                       header.traceparent))  # fmt: skip
        elif kind == Kind.ABORT and (task := self.tasks.get(header.rid)) is not None:
            # after the task's first step (its RUN may have come in this same read): a task cancelled before
            # it never runs its body, which is what confirms the abort (else the worker is killed for it)
            asyncio.get_running_loop().call_soon(task.cancel)

    async def _execute(self, rid: int, payload: bytes, model: str = "", traceparent: str = "") -> None:
        emit = Emitter(self.sock, self.codec, rid, self.spec.coalesce)
        try:
            call = _read_call(self.codec, payload)
            if traceparent and isinstance(call, (Call, HttpCall)):
                call = traced(call, traceparent)
            if isinstance(call, Resume):  # a stream that broke after output, continued (on the same model)
                await run_resume(call, self.spec.profile.family, functools.partial(self._run, model=model), emit)
            else:
                await self._run(call, emit, model)
        except asyncio.CancelledError:
            await emit.error(ErrorInfo(Code.CANCELLED, "cancelled by the broker"))
        except Exception as exc:
            log.debug("request %d failed", rid, exc_info=True)
            await emit.error(translate(exc))
        finally:
            self.tasks.pop(rid, None)

    async def _run(self, call: Call | HttpCall | TimedCall, emit: Any, model: str = "") -> None:
        if model and not isinstance(call, TimedCall):  # a fallback's model (a load test has none)
            call = retarget(call, model, self.spec.profile)
        kind, clients = self.spec.profile.family, self._clients_for(call)
        if isinstance(call, TimedCall):
            profile = self.spec.profile
            how = None if profile.kind in clouds.FIRST_PARTY else await signed(clients.sdk, clients.http, profile,
                                                                                call.http)  # fmt: skip
            await run_timed(clients.sdk, self.timed, kind, call, emit, self.spec.allow_overrides, how)
        elif isinstance(call, HttpCall):
            await run_http(clients.sdk, clients.http, self.http, self.spec.profile, call, emit,
                           self.spec.allow_overrides)  # fmt: skip
        else:
            kwargs = clouds.call_kwargs(self.spec.profile, call.kwargs)
            await run_call(clients.sdk, kind, clients.resource_type, call.method, kwargs, emit)

    def _clients_for(self, call: Call | HttpCall | TimedCall) -> Clients:
        """The worker's clients, if they can run `call`: one that brings its own key needs none of the pool's.
        (A stored error is raised without the tracebacks of its earlier raises, which would pile up.)"""
        http = call.http if isinstance(call, TimedCall) else call
        clients = self._placed(http.placement) if isinstance(http, HttpCall) and http.placement else self.clients
        if clients is None:
            raise self.client_error.with_traceback(None)  # type: ignore[union-attr]
        if clients.no_key is not None and not brings_own_key(call):
            raise clients.no_key.with_traceback(None)
        return clients

    def _placed(self, placement: dict[str, str]) -> Clients | None:
        """The clients for a cloud client's placement: the worker's own where it is the profile's; with
        allow_overrides, clients moved there (made once; the call's placement may complete a profile whose
        own could not be built); else a BadCall naming both (worker/clouds)."""
        sdk = self.clients.sdk if self.clients is not None else None
        moved = clouds.placed(self.spec.profile, sdk, placement, self.spec.allow_overrides)
        if moved is None:
            return self.clients
        key = tuple(sorted(placement.items()))
        if key not in self.placed:
            self.placed[key] = build_client(moved)
        return self.placed[key]

    def _heartbeat(self, ctx: zmq.Context) -> None:
        sock = new_socket(ctx, zmq.DEALER, identity=(self.spec.ident + "/hb").encode(), sndhwm=4)
        sock.connect(self.spec.backend)
        beat = Codec().frames(Kind.HEARTBEAT, Heartbeat(self.spec.ident, self.spec.token))
        interval = self.spec.heartbeat_interval
        while True:
            readable, _, _ = select.select([self.spec.death_fd], [], [], interval)
            if readable:  # the broker's end of the liveness pipe closed: the broker is gone
                os._exit(0)
            try:
                sock.send_multipart(beat, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass


def run_worker(spec: WorkerSpec) -> None:
    logging.basicConfig(
        level=spec.log_level.upper(), format=f"%(asctime)s worker {spec.ident} %(name)s %(levelname)s %(message)s"
    )
    stacks.register()
    asyncio.run(Worker(spec).run())
