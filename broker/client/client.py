"""The low-level client: submit SDK calls to a broker, iterate their events, get results.

`AsyncClient` is the core (one DEALER socket, read by its event loop). `Client` is the
thin sync wrapper: it runs an `AsyncClient` on a private event-loop thread; callers send
from their own threads, and each call's events are handed to the calling thread through
a thread-safe queue, so iterating a stream costs no cross-thread round trip per event.

    with Pool() as pool, pool.client() as client:
        call = client.submit("anthropic", "messages.create", model=..., max_tokens=..., messages=..., stream=True)
        for event in call:
            print(event.name, event.json())
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import zmq
from zmq.utils import monitor as zmq_monitor

from ..config import MAX_MESSAGE_BYTES
from ..errors import (
    BadRequest,
    BrokerRefused,
    BrokerUnavailable,
    ClientClosed,
    IsopoolError,
    RequestError,
    error_for,
)
from ..protocol import (
    MAX_HEADER_BYTES,
    Call,
    Code,
    Codec,
    ErrorInfo,
    HttpCall,
    Kind,
    ProtocolError,
    Ref,
    Response,
    Served,
    Snapshot,
    Submit,
    TimedCall,
)
from ..protocol import Error as ErrorHeader
from ..wire.curve import secure_client
from ..wire.loopsock import LoopSocket
from ..wire.zmqio import BIG_HWM, NOBLOCK, new_socket
from . import tracecontext
from .fallbacks import fields_of, top_level

log = logging.getLogger(__name__)
_JSON = msgspec.json.Decoder()
_END = object()
_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_STOPPED_POLL = 0.25  # s: how soon a wait on the loop's thread notices that the loop stopped under it
_END_POLL = 0.002  # s: how often a close looks whether the loop's thread has ended


class StreamEvent(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One real event of a stream: the SSE event name and the provider's own JSON bytes."""

    name: str
    data: bytes

    def json(self) -> Any:
        return _JSON.decode(self.data)

    def sse(self) -> bytes:
        """The event in SSE framing again, as the provider sent it (for relays)."""
        lines = b"data: " + self.data.replace(b"\n", b"\ndata: ") + b"\n"  # a line each
        return (b"event: " + self.name.encode() + b"\n" + lines + b"\n") if self.name else lines + b"\n"


_EVENTS = msgspec.msgpack.Decoder(list[StreamEvent])


def sse(events: list[StreamEvent]) -> bytes:
    """Events in SSE framing, as one write."""
    return b"".join([event.sse() for event in events])


class Result(msgspec.Struct, frozen=True):
    """How a call ended: HTTP status and headers, (for non-streaming calls) the JSON body, and how many
    malformed events (`data:` lines that were not JSON) the worker dropped from the provider's stream."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    malformed_events: int = 0

    def json(self) -> Any:
        return _JSON.decode(self.body)


class _Sink:
    """Where the reader task puts one call's messages: an asyncio queue, or a thread-safe one. The item that
    ends the call is also kept: CPython checks for a Ctrl-C right after a C call returns, so a wait cut short
    there has taken its item from the queue, and the next wait for that end would wait forever."""

    def __init__(self, threadsafe: bool) -> None:
        self.queue: Any = queue.SimpleQueue() if threadsafe else asyncio.Queue()
        self.last: Any = None

    def put(self, item: Any, last: bool = False) -> None:
        if last:
            self.last = item
        self.queue.put_nowait(item)

    def get(self) -> Any:
        """The next item, waiting for it (a thread-safe sink's); the end again if it was queued and is gone."""
        if self.last is not None and self.queue.empty():
            return self.last
        return self.queue.get()


class _CallState:
    __slots__ = ("rid", "sink", "raw", "relayed", "head", "result", "error", "done", "events", "served")

    def __init__(self, rid: int, sink: _Sink, raw: bool = False, relayed: bool = False) -> None:
        self.rid = rid
        self.sink = sink
        self.raw = raw  # a control call (STATS, PING): the result payload is not a Response
        self.relayed = relayed  # an HTTP request (shim, gateway): a provider's error answer is its result
        self.head: Response | None = None
        self.result: Result | None = None
        self.error: IsopoolError | None = None
        self.done = False
        self.events = 0  # received by the reader: what the caller was delivered if it kept reading
        self.served: Served | None = None  # who answered (from the HEAD, RESULT or ERROR header)

    def take(self, item: Any) -> Any:
        """Account for one queued item; returns a list of events, or _END once the call has ended
        (the last events and the end may come as one item: those events, and the call has ended)."""
        if isinstance(item, list):
            return item
        if isinstance(item, _Last):
            self.take(item.end)
            return item.events
        if isinstance(item, IsopoolError):
            self.error = item  # type: ignore[assignment]
        elif isinstance(item, Result):
            self.result = item
        self.done = True
        return _END

    def gather(self, item: Any, queue: Any) -> list[StreamEvent]:
        """The events of `item` and of every message already queued behind it, up to the call's end."""
        events: list[StreamEvent] = []
        while (taken := self.take(item)) is not _END:
            events += taken
            if queue.empty():
                break
            item = queue.get_nowait()
        return events

    def finish(self) -> Result:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class _Last(msgspec.Struct, frozen=True):
    """A call's last events and its end (a Result or an error), which came in one message: queued as one
    item, so that its reader wakes once for them."""

    events: list
    end: Any


def _joined(first: Any, then: Any) -> Any:
    """Two queue items of one call as one: events before more events, or before the end."""
    return first + then if isinstance(then, list) else _Last(first, then)


class _Call:
    """What both kinds of call show of their state."""

    def __init__(self, client: Any, state: _CallState) -> None:
        self._client, self._state = client, state

    def _sink(self) -> _Sink:
        """The call's sink, to wait on: in a forked child, a copy nothing will ever feed."""
        _check_process(self._client.pid)
        return self._state.sink

    @property
    def request_id(self) -> int:
        return self._state.rid

    @property
    def head(self) -> Response | None:
        """A stream's HTTP status and headers: set once its first event has arrived."""
        return self._state.head

    @property
    def ended(self) -> bool:
        """Whether the call's end (its result or error) has been taken from its queue."""
        return self._state.done

    @property
    def served(self) -> Served | None:
        """Who answered: attempts, profile, deployment, model and rescue (set with the head, or at the end)."""
        return self._state.served


class AsyncCall(_Call):
    """One submitted call (asyncio). Iterate it for stream events; await `result()` for the end."""

    _client: AsyncClient

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        state = self._state
        try:
            while not state.done:
                item = state.take(await self._sink().queue.get())
                if item is _END:
                    break
                for event in item:
                    yield event
        finally:
            if not state.done:
                await self.cancel()
        state.finish()

    async def batch(self) -> list[StreamEvent]:
        """Every event that has arrived, waiting for one if none has: what a relay writes at once.
        [] once the call has `ended` (then `result()` gives its end or raises its error)."""
        state = self._state
        return [] if state.done else state.gather(await self._sink().queue.get(), state.sink.queue)

    async def result(self) -> Result:
        """The end of the call, discarding any events not yet read; raises its RequestError."""
        state = self._state
        while not state.done:
            state.take(await self._sink().queue.get())
        return state.finish()

    async def cancel(self) -> None:
        self._client._cancel(self._state)


class SyncCall(_Call):
    """One submitted call, for a `Client`'s caller thread."""

    _client: Client

    def __iter__(self) -> Iterator[StreamEvent]:
        state = self._state
        try:
            while not state.done:
                item = state.take(self._sink().get())
                if item is _END:
                    break
                yield from item
        finally:
            if not state.done:
                self.cancel()
        state.finish()

    def batch(self) -> list[StreamEvent]:
        """As `AsyncCall.batch`: every event that has arrived, waiting for one; [] once `ended`."""
        state = self._state
        return [] if state.done else state.gather(self._sink().get(), state.sink.queue)

    def result(self) -> Result:
        state = self._state
        while not state.done:
            state.take(self._sink().get())
        return state.finish()

    def cancel(self) -> None:
        self._client._async._cancel(self._state)


class AsyncClient:
    """A connection to a broker, used from one event loop (or through `Client`).

    The socket is a `LoopSocket`: the loop drains every waiting message straight into its
    call's queue, and a send goes out at once from the caller, so `Client`'s threads send
    without waking the loop's thread.

    `broker_timeout`: with calls in flight and nothing heard for this long, the broker
    is probed; if it stays silent as long again, every call fails with BrokerUnavailable.

    `max_message_bytes`: the broker's limit (default `$ISOPOOL_MAX_MESSAGE_BYTES`, else the
    pool's default). A larger request is refused here: sent, ZeroMQ would drop the whole
    connection. A connection dropped all the same (a broker with a lower limit, a restart)
    ends every call in flight on it with BrokerUnavailable, since no answer can come back."""

    def __init__(self, url: str, broker_timeout: float = 10.0, max_message_bytes: int | None = None) -> None:
        self.url = url
        self.pid = os.getpid()  # its connection and loop are this process's: a forked child's copy is dead
        self.broker_timeout = broker_timeout
        self.max_message_bytes = max_message_bytes or int(
            os.environ.get("ISOPOOL_MAX_MESSAGE_BYTES") or MAX_MESSAGE_BYTES
        )
        sock, monitor = self._connect()
        self._sock = LoopSocket(sock, self._route)  # its lock also guards the call table
        self._monitor = LoopSocket(monitor, self._on_connection_event)
        self._codec = Codec()
        self._ids = itertools.count(1)
        self._calls: dict[int, _CallState] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that watches the socket
        self._attaching = threading.Lock()  # two loops' first calls at once: one watches, the other is refused
        self._watchdog: asyncio.TimerHandle | None = None
        self._heard = time.monotonic()
        self._probing = False
        self._closed = False
        self._refused = ""  # why the broker refused this client's CURVE key, once it did

    async def submit(
        self,
        profile: str,
        method: str,
        /,
        *,
        first_event_timeout: float | None = None,
        stale_timeout: float | None = None,
        deadline: float | None = None,
        max_attempts: int | None = None,
        **kwargs: Any,
    ) -> AsyncCall:
        """Send an SDK call (`method` such as "messages.create", with the SDK's keyword arguments)."""
        self._attach()
        limits = CallLimits(first_event_timeout, stale_timeout, deadline, max_attempts)
        return AsyncCall(self, self._submit(False, profile, Call(method, kwargs), kwargs, limits))

    async def submit_http(
        self,
        profile: str,
        call: HttpCall | TimedCall,
        limits: CallLimits | None = None,
        fields: dict[str, Any] | None = None,
    ) -> AsyncCall:
        """Send an HTTP request built by an SDK (the shim's transport) or a load test; the worker adds its key.
        `fields`: its body's `model` and `stream` where the caller has read them (fallbacks.take_fallbacks)."""
        self._attach()
        fields = _body_fields(call) if fields is None else fields
        return AsyncCall(self, self._submit(False, profile, call, fields, limits or CallLimits()))

    async def request(self, profile: str, method: str, /, **kwargs: Any) -> Result:
        """Submit and wait for the result."""
        return await (await self.submit(profile, method, **kwargs)).result()

    def _submit(
        self,
        threadsafe: bool,
        profile: str,
        call: Call | HttpCall | TimedCall,
        fields: dict[str, Any],
        limits: CallLimits,
    ) -> _CallState:
        """Register a call and send it; safe from any thread once the loop is attached.
        `fields`: the call's `model` and `stream`, which the broker reads without the payload."""
        if self._closed:
            raise ClientClosed("this client is closed")
        rid = next(self._ids)
        model, stream = str(fields.get("model", "")), bool(fields.get("stream"))
        method = (
            call.method if isinstance(call, Call) else call.path.split("?")[0] if isinstance(call, HttpCall) else ""
        )
        header = Submit(
            rid, profile, model, stream, limits.first_event_timeout, limits.stale_timeout, limits.deadline,
            limits.max_attempts, limits.read_timeout, limits.fallbacks, method,
            limits.traceparent or tracecontext.current(), limits.caller,
        )  # fmt: skip
        try:
            payload = self._codec.encode(call)
        except (TypeError, msgspec.EncodeError) as exc:
            raise BadRequest(ErrorInfo(Code.BAD_REQUEST, f"arguments cannot be sent to the pool: {exc}")) from None
        if len(payload) > self.max_message_bytes:
            raise BadRequest(ErrorInfo(Code.BAD_REQUEST, (
                f"request of {len(payload)} bytes exceeds max_message_bytes ({self.max_message_bytes}): "
                "send less, or raise max_message_bytes on the broker and on this client"
            )))  # fmt: skip
        frames = self._codec.frames(Kind.SUBMIT, header, payload)
        if len(frames[1]) > MAX_HEADER_BYTES:  # the broker would refuse it under no request id: never answered
            raise BadRequest(ErrorInfo(Code.BAD_REQUEST, (
                f"the call's profile, model and fallbacks take {len(frames[1])} bytes, over the pool's "
                f"{MAX_HEADER_BYTES}: use shorter names"
            )))  # fmt: skip
        state = _CallState(rid, _Sink(threadsafe), relayed=isinstance(call, HttpCall))
        self._send(frames, state)
        return state

    def _attach(self) -> None:
        """Have the running loop watch the socket: on first use, or in a new loop once the one that watched
        it has stopped (`asyncio.run` twice); while that one runs, this one is refused. Never in a forked child:
        its loop's selector shares the parent's epoll, so unwatching there would unwatch the parent's socket."""
        _check_process(self.pid)
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        with self._attaching:
            if self._closed:  # its socket is gone: a call from a new loop must not reach it
                raise ClientClosed("this client is closed")
            if self._loop is not None:
                if self._loop.is_running():
                    raise ClientClosed(
                        "this client is in use by another event loop, which is running: make an AsyncClient in "
                        "each loop (or use a Client, which any thread may share)"
                    )
                self._leave_loop()
            self._sock.attach(loop)
            self._monitor.attach(loop)
            self._watchdog = loop.call_later(self.broker_timeout, self._check_broker)
            self._loop = loop

    def _leave_loop(self) -> None:
        """The loop that watched the socket has stopped: no longer watched by it, and the calls it left in flight
        end (cancelled at the broker; ClientClosed for anyone who awaits one, should that loop run again)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        with self._sock.lock:
            self._sock.detach()
            self._monitor.detach()
            for state in list(self._calls.values()):
                self._cancel(state)
            self._fail_all(ClientClosed("the event loop that made this call ended while it was in flight"))

    def _send(self, frames: list[bytes], state: _CallState | None = None) -> None:
        """Send (registering the call first, so that its answer finds it); safe from any thread.
        Never blocks: with no connection to the broker (none made yet, or refused, as a
        CURVE handshake with a key the broker does not allow is), raise BrokerUnavailable. In a forked
        child, nothing is sent: the socket (and the state of its lock) are the parent's."""
        if os.getpid() != self.pid:
            if state is None:
                return  # a cancel: the call runs for the parent, who still reads it
            _check_process(self.pid)
        with self._sock.lock:
            if self._closed:  # closed by another thread since the caller looked: its socket is gone
                if state is None:
                    return  # a cancel: nothing runs there any more
                raise ClientClosed("this client is closed")
            if state is not None and self._refused:  # this broker refused this client's key: nothing will pass
                raise BrokerRefused(self._refused)
            if state is not None:
                self._calls[state.rid] = state
            try:
                self._sock.send(frames, NOBLOCK)
            except BaseException as exc:  # not sent, or (Ctrl-C) sent for nobody: its caller never gets the call
                if state is not None:
                    self._calls.pop(state.rid, None)
                if not isinstance(exc, zmq.Again):
                    if state is not None:  # it may have gone whole (a cut one the broker drops): it would run anyway
                        with contextlib.suppress(zmq.ZMQError):
                            self._sock.send(self._codec.frames(Kind.CANCEL, Ref(state.rid)), NOBLOCK)
                    raise
                unconnected = (
                    f"not connected to the broker at {self.url} (is it running? for tcp://, are the CURVE keys right?)"
                )
                raise BrokerUnavailable(unconnected) from None

    async def snapshot(self) -> Snapshot:
        """The broker's stats snapshot (workers, counters, histograms), typed."""
        state = self._control(Kind.STATS, False)
        while not state.done:
            state.take(await state.sink.queue.get())
        return self._codec.snapshot(state.finish().body)

    async def stats(self) -> dict[str, Any]:
        """The broker's stats snapshot as plain data (what `isopool stats --json` prints)."""
        return msgspec.to_builtins(await self.snapshot())

    async def ping(self) -> None:
        state = self._control(Kind.PING, False)
        while not state.done:
            state.take(await state.sink.queue.get())
        state.finish()

    def _control(self, kind: Kind, threadsafe: bool) -> _CallState:
        self._attach()
        rid = next(self._ids)
        state = _CallState(rid, _Sink(threadsafe), raw=True)
        self._send(self._codec.frames(kind, Ref(rid)), state)
        return state

    def _cancel(self, state: _CallState) -> None:
        """Tell the broker to stop a call; safe from any thread."""
        if not state.done and state.rid in self._calls:  # closed: the table is empty, and `_send` checks again
            try:
                self._send(self._codec.frames(Kind.CANCEL, Ref(state.rid)))
            except BrokerUnavailable:
                pass  # nothing runs it there any more

    def _route(self, frames: list[bytes]) -> None:
        """One message from the broker, each of its records to its call (run by the loop, under the socket's lock)."""
        self._heard = time.monotonic()
        self._probing = False
        try:
            records = self._codec.records(frames)
        except ProtocolError:
            log.warning("dropping a malformed message from the broker")
            return
        items: dict[_CallState, Any] = {}  # each call's share of the message, queued as one item
        for kind, header, payload in records:
            state = self._calls.get(header.rid)
            item = None if state is None else self._take(state, kind, header, payload)
            if item is not None:
                items[state] = item if state not in items else _joined(items[state], item)  # type: ignore[index]
        for state, item in items.items():
            state.sink.put(item, last=state.rid not in self._calls)  # its end left the table

    def _take(self, state: _CallState, kind: Kind, header: Any, payload: bytes) -> Any:
        """What one record of the broker's brings its call to queue (events, or its end), or None."""
        if kind == Kind.EVENT:
            try:
                events = _EVENTS.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                del self._calls[header.rid]
                return error_for(ErrorInfo(Code.PROTOCOL, f"unreadable events from the broker: {exc}"), state.rid)
            state.events += len(events)
            return events
        if kind == Kind.HEAD:
            state.head = self._codec.response(payload)
            state.served = header
        elif kind in (Kind.RESULT, Kind.ERROR):
            del self._calls[header.rid]
            state.served = header if kind == Kind.RESULT else _served(header)
            return self._ending(state, kind, payload)
        return None

    def _connect(self) -> tuple[zmq.Socket, zmq.Socket]:
        """A DEALER connecting to the broker, and the monitor that reports it dropped or refused."""
        # The process-wide context: a private one left unclosed would block the garbage
        # collector in `term()` (an SDK client of the shim is often never closed).
        sock = new_socket(zmq.Context.instance(), zmq.DEALER, sndhwm=BIG_HWM, rcvhwm=BIG_HWM)
        self._keyed = secure_client(sock, self.url)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | _REFUSED)
        sock.connect(self.url)
        return sock, monitor

    def _on_connection_event(self, frames: list[bytes]) -> None:
        """The connection to the broker was dropped, or the broker refused this client's CURVE key:
        nothing in flight on it can be answered (ZeroMQ reconnects under a new identity), so those
        calls end now rather than never. Requests still queued in the socket would go out on the
        next connection, to run unanswered: the socket is replaced, and they are dropped with it."""
        event = zmq_monitor.parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_MONITOR_STOPPED:
            return
        if event & _REFUSED:
            why = self._refused = (
                f"the broker at {self.url} refused this client's CURVE key (ISOPOOL_CLIENT_KEY): add its public key "
                "to the broker's curve_clients_dir"
                if self._keyed
                else f"the broker at {self.url} takes only clients with CURVE keys, and this one has none: set "
                "ISOPOOL_CLIENT_KEY (its secret certificate) and ISOPOOL_BROKER_KEY (the broker's public key; "
                "`isopool keygen` makes them)"
            )
        else:
            causes = "or the broker restarted" if self._keyed or not self.url.startswith("tcp://") else (
                "the broker restarted, or it takes only clients with CURVE keys, and this one has none: set "
                "ISOPOOL_CLIENT_KEY and ISOPOOL_BROKER_KEY")  # fmt: skip
            why = (f"the connection to the broker at {self.url} was dropped (a message over its max_message_bytes, "
                   f"{causes}) while this call was in flight; it was not answered")  # fmt: skip
        with self._sock.lock:
            self._sock.drain()  # answers that arrived before the drop
            if not self._calls:
                return
            log.warning("%s (%d calls in flight)", why.partition(" while")[0], len(self._calls))
            self._fail_all((BrokerRefused if event & _REFUSED else BrokerUnavailable)(why))
            old_monitor = self._monitor
            self._sock.sock.disable_monitor()  # as in `close`: stopped before its reader goes
            sock, monitor = self._connect()
            self._sock.replace(sock)
            self._monitor = LoopSocket(monitor, self._on_connection_event)
        loop = asyncio.get_running_loop()
        self._monitor.attach(loop)
        loop.call_soon(old_monitor.close)  # not from inside its own drain

    def _check_broker(self) -> None:
        """With calls in flight, probe a silent broker; fail every call if it stays silent."""
        self._watchdog = asyncio.get_running_loop().call_later(self.broker_timeout / 2, self._check_broker)
        silent = time.monotonic() - self._heard
        if not self._calls or silent < self.broker_timeout:
            return
        try:
            if not self._probing:
                self._probing = True
                self._control(Kind.PING, False)
                return
            if silent < 2 * self.broker_timeout:
                return
            error = BrokerUnavailable(f"no answer from the broker at {self.url} for {2 * self.broker_timeout:g}s")
        except BrokerUnavailable as exc:  # not even connected
            error = exc
        with self._sock.lock:
            self._fail_all(error)
        self._probing = False

    def _ending(self, state: _CallState, kind: Kind, payload: bytes) -> Result | RequestError:
        try:
            if kind == Kind.ERROR:
                info = self._codec.error(payload)
                if state.relayed and info.code == Code.PROVIDER_STATUS and info.status:  # the pool's retries spent
                    return Result(info.status, info.headers, info.body or b"")
                if state.events > info.delivered:  # worker-made errors do not know what the caller saw
                    info = msgspec.structs.replace(info, delivered=state.events)
                error = error_for(info, state.rid)
                error.served = state.served
                return error
            return self._result(state, payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return error_for(ErrorInfo(Code.PROTOCOL, f"unreadable answer from the broker: {exc}"), state.rid)

    def _result(self, state: _CallState, payload: bytes) -> Result:
        if state.raw:
            return Result(200, [], payload)
        if not payload:
            head = state.head
            return Result(head.status, head.headers, b"") if head else Result(200, [], b"")
        response = self._codec.response(payload)
        return Result(response.status, response.headers, response.body, response.malformed_events)

    def _fail_all(self, exc: Exception) -> None:
        """End every call with `exc`; hold the lock (a `Client` caller could be registering one). Each leaves
        the table once its end is queued: cut short (Ctrl-C), a second pass ends the rest, none is lost."""
        for rid in list(self._calls):
            try:
                self._calls[rid].sink.put(exc, last=True)
            except RuntimeError:  # a waiter of a loop that has closed cannot be woken
                pass
            del self._calls[rid]

    async def close(self) -> None:
        if self._closed or os.getpid() != self.pid:  # a forked child's copy: the connection is the parent's
            return
        self._attach()  # from a new loop, once the one that watched the socket has stopped
        self._end_calls()
        self._close_sockets()

    def _end_calls(self, cancel: bool = True) -> None:
        """Closed from now on: each call in flight ends with ClientClosed, cancelled at the broker unless not
        `cancel` (a signal handler's close, whose thread may be halfway through sending a message). Safe from
        any thread, and again."""
        with self._sock.lock:
            if self._closed:
                return
            for state in list(self._calls.values()) if cancel else ():
                self._cancel(state)
            self._fail_all(ClientClosed("the client was closed while this call was in flight"))
            self._closed = True  # last: a close cut short before here is finished by the next

    def _close_sockets(self) -> None:
        """Stop watching the sockets and close them; on the loop's thread, once the calls have ended."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        with self._sock.lock:
            if self._sock.sock.closed:
                return
            # monitor off before its socket closes: stopping a monitor whose reader is gone can block in libzmq
            self._sock.sock.disable_monitor()
            self._monitor.close()
            self._sock.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Client:
    """Synchronous client: an `AsyncClient` on a private event-loop thread. Thread-safe. Closed by `close()`,
    or, left unclosed, once nothing refers to it (its thread and sockets stop then)."""

    def __init__(self, url: str, broker_timeout: float = 10.0, max_message_bytes: int | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        # Its end is watched for on `_ended.is_set()`, a plain read: join() and Event.wait() take locks in Python
        # code, which a Ctrl-C between taking and entering leaves taken (join() even marks the thread stopped
        # while it runs), and then every later wait, and the thread's own end, hangs.
        self._ended = threading.Event()
        self._thread = threading.Thread(target=_serve, args=(self._loop, self._ended), name="isopool-client",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        self._closing = threading.RLock()  # re-entrant: a signal handler may close within its thread's close
        self._closer = threading.local()  # `busy` in a thread that is closing: a handler's close there returns
        self._closed = False
        self.pid = os.getpid()
        try:
            self._async = self._run(_make_async(url, broker_timeout, max_message_bytes))
        except BaseException:  # a bad URL, a CURVE key that cannot be read: the thread goes too
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._wait_ended()
            raise
        self._garbage = weakref.finalize(self, _stop, self._loop, self._async)  # left unclosed
        self.url = url

    def _run(self, coro: Any) -> Any:
        """Run `coro` on the loop's thread and wait for it; ClientClosed if the loop stopped (the client was
        closed by another thread) before it could. Its end comes through a SimpleQueue, whose lock is C's:
        a Ctrl-C while waiting for a concurrent Future could leave that future's lock taken, and the loop's
        thread, setting its result, would hang on it."""
        ended: queue.SimpleQueue = queue.SimpleQueue()

        def start() -> None:
            self._loop.create_task(coro).add_done_callback(ended.put)

        try:
            _check_process(self.pid)
            if self._closed:
                raise ClientClosed("this client is closed")
            try:
                self._loop.call_soon_threadsafe(start)
            except RuntimeError:  # the loop closed since the look
                raise ClientClosed("this client is closed") from None
        except ClientClosed:
            coro.close()
            raise
        while True:
            try:
                task = ended.get(timeout=_STOPPED_POLL)
            except queue.Empty:
                if self._ended.is_set() and ended.empty():  # the loop stopped before it started
                    coro.close()
                    raise ClientClosed("this client is closed") from None
                continue
            if task.cancelled():  # the loop stopped with it under way
                raise ClientClosed("this client is closed")
            return task.result()

    def _wait_ended(self) -> None:
        """Until the loop's thread has ended (see `_ended`)."""
        while not self._ended.is_set():
            time.sleep(_END_POLL)

    def submit(
        self,
        profile: str,
        method: str,
        /,
        *,
        first_event_timeout: float | None = None,
        stale_timeout: float | None = None,
        deadline: float | None = None,
        max_attempts: int | None = None,
        **kwargs: Any,
    ) -> SyncCall:
        limits = CallLimits(first_event_timeout, stale_timeout, deadline, max_attempts)
        return self._submit(profile, Call(method, kwargs), kwargs, limits)

    def submit_http(
        self, profile: str, call: HttpCall, limits: CallLimits | None = None, fields: dict[str, Any] | None = None
    ) -> SyncCall:
        """Send an HTTP request built by an SDK (the shim's transport); the worker adds its key."""
        fields = _body_fields(call) if fields is None else fields
        return self._submit(profile, call, fields, limits or CallLimits())

    def _submit(
        self, profile: str, call: Call | HttpCall | TimedCall, fields: dict[str, Any], limits: CallLimits
    ) -> SyncCall:
        return SyncCall(self, self._async._submit(True, profile, call, fields, limits))

    def request(self, profile: str, method: str, /, **kwargs: Any) -> Result:
        return self.submit(profile, method, **kwargs).result()

    def snapshot(self) -> Snapshot:
        return self._run(self._async.snapshot())

    def stats(self) -> dict[str, Any]:
        return self._run(self._async.stats())

    def ping(self) -> None:
        self._run(self._async.ping())

    def close(self) -> None:
        """End every call in flight with ClientClosed, close the sockets and stop the loop's thread. Safe from
        several threads at once (each returns once closed) and again after an interrupted close (it finishes
        it). From a signal handler whose thread was sending, or from the loop's own thread, it ends the calls
        and returns at once; the sockets close as soon as that send is done."""
        if os.getpid() != self.pid:  # a forked child's copy: the loop and the connection are the parent's
            return
        if self._async._sock.lock._is_owned() or threading.current_thread() is self._thread:
            self._closed = True
            self._async._end_calls(cancel=False)  # cancels could split the message this thread is sending
            _stop(self._loop, self._async)
            return
        if getattr(self._closer, "busy", False):  # a signal handler inside this thread's own close
            return
        with self._closing:
            self._closer.busy = True
            try:
                self._closed = True
                self._garbage.detach()
                self._async._end_calls()
                _stop(self._loop, self._async)
                self._wait_ended()
            finally:
                self._closer.busy = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CallLimits(msgspec.Struct, frozen=True):
    """Per-call overrides of the pool's time limits and attempts; None keeps the pool's."""

    first_event_timeout: float | None = None
    stale_timeout: float | None = None
    deadline: float | None = None
    max_attempts: int | None = None
    read_timeout: float | None = None  # caps first_event_timeout and stale_timeout (an SDK's per-call timeout)
    fallbacks: list[tuple[str, str]] | None = None  # (profile, model) tried in order, "" the call's own; the
    # pool refuses those its `request_fallbacks` does not allow
    traceparent: str = ""  # the caller's trace context (the gateway's callers); else the current span's, if any
    caller: str = ""  # who to account the call to (the gateway: its token's name)


def _check_process(pid: int) -> None:
    """ClientClosed in a forked child: a client's loop thread and connection stayed in the parent, so
    nothing would ever answer there."""
    if os.getpid() != pid:
        raise ClientClosed(
            f"this client was made in process {pid} and this is a fork of it, where its connection does not "
            "work: make a new client in this process"
        )


def _served(error: ErrorHeader) -> Served:
    return Served(error.rid, error.attempts, error.profile, error.deployment, error.model, error.rescue)


def _body_fields(call: HttpCall | TimedCall) -> dict[str, Any]:
    """`model` and `stream` of a JSON request body (for the broker's per-model limits)."""
    return fields_of(top_level((call.http if isinstance(call, TimedCall) else call).body))


def _serve(loop: asyncio.AbstractEventLoop, ended: threading.Event) -> None:
    """A `Client`'s thread: its loop until stopped; then, as `asyncio.run` does, the tasks left (a call that
    raced the close) cancelled and let end, and the loop closed; `ended` set last."""
    try:
        loop.run_forever()
    finally:
        while tasks := asyncio.all_tasks(loop):  # those a waiting thread's future started meanwhile, too
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(asyncio.sleep(0))  # their ends passed on to the threads that wait for them
        loop.close()
        ended.set()


def _stop(loop: asyncio.AbstractEventLoop, client: AsyncClient) -> None:
    """Have a `Client`'s loop end its calls, close its sockets and stop (by `close`, again after an interrupted
    one, or once the client is garbage): once only, a second stop would cut short the loop's last tasks."""

    def shut() -> None:
        if client._sock.sock.closed:
            return
        client._end_calls()
        client._close_sockets()
        loop.stop()

    with contextlib.suppress(RuntimeError):  # the loop is closed: all that is done
        loop.call_soon_threadsafe(shut)


async def _make_async(url: str, broker_timeout: float, max_message_bytes: int | None) -> AsyncClient:
    """An AsyncClient watched by the running loop, so that other threads may send at once."""
    client = AsyncClient(url, broker_timeout, max_message_bytes)
    client._attach()
    return client
