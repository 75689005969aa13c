"""Timing a load test's stream where its bytes arrive, instead of relaying its events.

A `TimedCall` is sent like any other HTTP call, but what goes back to the caller is one
`Tick` per read of the stream: the arrival time taken here, before anything is parsed or
relayed, the number of output deltas in that read, and the usage and errors once the
provider reports them; the caller builds no SDK objects. A stream without output for its
stale timeout is ended here with STALLED (the worker's other streams go on); the broker's
watchdog, set later, still kills a worker that hangs.

A server that streams one token per write makes one read per token, so the cost of a read
decides how fast the generator is: reads go through aiohttp's C parser rather than the SDK's
httpx stack (worker/aio.py), a stream's deadline is one timer rather than one moved at every read, and the
ticks of all the worker's streams leave together a few times a second (each keeps its own
arrival time, so only the caller's live view waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import msgspec
import yarl

from broker.eventstream import CONTENT_TYPE as EVENT_STREAM
from broker.protocol import TICK, Code, ErrorInfo, Response, Tick, TimedCall

from .aio import Session, proxy_for
from .counts import api_of, count
from .exchange import destination
from .frames import FrameSplitter
from .hygiene import GRACE
from .sse import EventSplitter

FLUSH_EVERY = 0.05  # seconds a tick may wait to leave with the others
_DRAIN = 1.0  # seconds to read what follows `[DONE]`, so that the connection can be used again
_TICK = msgspec.msgpack.Encoder()


class TimedTransport:
    """What a worker needs for timed calls: its aiohttp session (worker/aio.py, shared with relayed calls)
    and the outbox of their ticks."""

    def __init__(self, session: Session) -> None:
        self.session = session.get
        self.outbox = Outbox()


class Outbox:
    """The ticks of every stream of the worker that wait to be sent: all leave in one burst every
    FLUSH_EVERY seconds (one wake-up of the socket's I/O thread instead of one per stream), and a
    stream's own leave at once when it ends, ahead of its end."""

    def __init__(self) -> None:
        self.pending: dict[Any, list[tuple[str, bytes]]] = {}
        self.timer: asyncio.TimerHandle | None = None

    def add(self, emit: Any, tick: Tick) -> None:
        batch = self.pending.get(emit)
        if batch is None:
            batch = self.pending[emit] = []
            if self.timer is None:
                self.timer = asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush)
        batch.append((TICK, _TICK.encode(tick)))

    def flush(self) -> None:
        self.timer = None
        pending, self.pending = self.pending, {}
        for emit, batch in pending.items():
            emit.send_events(batch)

    def flush_one(self, emit: Any) -> None:
        if batch := self.pending.pop(emit, None):
            emit.send_events(batch)


class _Watch:
    """Raises TimeoutError in the stream's task when no real event came for `stale` seconds (none
    in `first`, before the first). One timer: when it goes off before the last event's deadline,
    it sets itself again for that deadline. Once the stream said it finished, `grace()` gives what
    may follow (usage, `[DONE]`, the close) a fixed time, after which the block ends quietly. Times
    are `time.monotonic()`, which `loop.time()` is."""

    def __init__(self, first: float, stale: float) -> None:
        self.loop, self.task = asyncio.get_running_loop(), asyncio.current_task()
        self.stale, self.last, self.fired, self.graced = stale, 0, False, False
        self.due = self.loop.time() + first
        self.handle = self.loop.call_at(self.due, self._check)

    def saw(self, arrived_ns: int) -> None:
        if not self.last:  # the first event: from now on the stale timeout counts, not the first-event one
            self.handle.cancel()
            self.handle = self.loop.call_at(arrived_ns * 1e-9 + self.stale, self._check)
        self.last = arrived_ns

    def grace(self, seconds: float) -> None:
        if not self.graced:
            self.graced, self.due = True, self.loop.time() + seconds
            self.handle.cancel()
            self.handle = self.loop.call_at(self.due, self._check)

    def _check(self) -> None:
        if self.last and not self.graced:
            self.due = self.last * 1e-9 + self.stale
        if self.loop.time() < self.due:
            self.handle = self.loop.call_at(self.due, self._check)
        else:
            self.fired = True
            self.task.cancel()  # type: ignore[union-attr]

    def __enter__(self) -> _Watch:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        self.handle.cancel()
        if self.fired and kind is asyncio.CancelledError and self.task.uncancel() == 0:  # type: ignore[union-attr]
            if self.graced:
                return True  # the stream had finished; nothing more came in time
            raise TimeoutError
        return False


async def run_timed(sdk: Any, transport: TimedTransport, kind: str, call: TimedCall, emit: Any,
                    allow_overrides: bool, signed: tuple[str, Any, bytes] | None = None) -> None:  # fmt: skip
    """Send a load test's request and time its answer: a `Tick` for the head, then one for each read
    of a stream (SSE, or a Bedrock's event-stream frames); a plain (non-stream) answer is relayed as it
    is, after the head tick. On a cloud profile, the request is `signed` (exchange.signed): its URL,
    headers and body, sent exactly so."""
    url, headers, body = signed or (*destination(sdk, call.http, allow_overrides), call.http.body)
    session, outbox = transport.session(), transport.outbox
    target = yarl.URL(url)
    proxy = proxy_for(target.scheme, target.host or "")
    sent = time.monotonic_ns()
    try:
        async with asyncio.timeout(call.first_event_timeout):
            response = await session.request(call.http.method, target, headers=[(k.lower(), v) for k, v in headers],
                                             data=body, proxy=proxy)  # fmt: skip
    except TimeoutError:
        await emit.error(ErrorInfo(Code.STALLED, f"first_event_timeout: no response in {call.first_event_timeout:g}s"))
        return
    try:
        outbox.add(emit, Tick(time.monotonic_ns(), sent=sent, status=response.status))
        if response.content_type in ("text/event-stream", EVENT_STREAM):
            splitter = EventSplitter() if response.content_type == "text/event-stream" else FrameSplitter()
            api = api_of(kind, call.http.path.split("?", 1)[0])
            await _time_stream(response, emit, outbox, api, call, splitter)
        else:
            body = await response.read()
            outbox.flush_one(emit)
            headers = [(str(k), v) for k, v in response.headers.items()]  # aiohttp's names are `istr`
            await emit.result(Response(response.status, headers, body))
    finally:
        outbox.flush_one(emit)
        response.release()


async def _time_stream(response: Any, emit: Any, outbox: Outbox, api: str, call: TimedCall, splitter: Any) -> None:
    """Tick each read until `[DONE]` or the close; once the stream said it finished, within GRACE. A
    stream whose bytes end before its terminal event was cut short: STREAM_INCOMPLETE, not a success."""
    read = response.content.readany
    events = tokens = 0
    ended = False
    try:
        with _Watch(call.first_event_timeout, call.stale_timeout) as watch:
            while not splitter.done:
                chunk = await read()
                arrived = time.monotonic_ns()  # before any parsing
                batch = splitter.feed(chunk) if chunk else splitter.end()
                if batch:  # pings and comments do not move the deadline: only real events do
                    watch.saw(arrived)
                    events += 1
                    counts = count(api, batch)
                    if counts.ended and not ended:
                        ended = True
                        watch.grace(GRACE)
                    tokens += counts.tokens
                    outbox.add(emit, Tick(arrived, counts.tokens, output_tokens=counts.output_tokens,
                                          input_tokens=counts.input_tokens, error=counts.error,
                                          cached_tokens=counts.cached_tokens,
                                          cache_creation_tokens=counts.cache_creation_tokens))  # fmt: skip
    except TimeoutError:
        outbox.flush_one(emit)
        what = f"stale_timeout: no output for {call.stale_timeout:g}s" if events else (
            f"first_event_timeout: no event in {call.first_event_timeout:g}s")  # fmt: skip
        await emit.error(ErrorInfo(Code.STALLED, f"{what} after {tokens} tokens"))
        return
    outbox.flush_one(emit)
    if not (ended or splitter.said_done):
        await emit.error(ErrorInfo(Code.STREAM_INCOMPLETE, f"the stream ended without its terminal event after "
                                                           f"{tokens} tokens: cut short"))  # fmt: skip
        return
    await emit.result(None)
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout(_DRAIN):
            while await read():
                pass
