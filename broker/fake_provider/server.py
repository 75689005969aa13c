"""The fake provider: a real aiohttp server on loopback speaking the Anthropic Messages,
OpenAI Chat Completions and OpenAI Responses APIs, and the same through Bedrock, Vertex and Azure
OpenAI (clouds.py), with injected faults (F1-F7).

Counters of what it served and injected are at `GET /_isopool/stats` (`POST /_isopool/reset`
zeroes them, empties the prefix cache, re-arms the faults chosen by header or model and ends a hold); the
headers a recent request came with, at `GET /_isopool/requests/{request-id}` (the id it
answered with), so that tests can check what reached the provider: keys, organization, others.
`POST /_isopool/hold` with `{"hold": true}` keeps every stream before its first event until
`{"hold": false}`, so that a test can see each slot of a pool busy at once on however slow a
machine (the held streams count as active and waiting; a client that leaves is noticed).
What a vLLM-like server shows Prometheus is at `GET /metrics` (see `metrics.py`).
With `prefix_cache`, its usage reports cached input tokens as a server with automatic prefix
caching would (see `prefix_cache.py`); it is off by default, since a request sent again would
then be answered with other usage, and tests check that a retried answer is byte-identical.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import Counter
from typing import Any

import msgspec
from aiohttp import web

from .broken import shaped
from .clouds import CloudRoutes
from .content import Reply, body_key
from .errors import error_response, fault_response
from .faults import FAULT_HEADER, LATENCY_HEADER, Fault, FaultPlan, parse_params
from .formats import AnthropicMessages, OpenAIChat, OpenAIResponses
from .framing import Sse
from .metrics import FakeMetrics
from .prefill import conversation, prefill_text, refusal
from .prefix_cache import PrefixCache
from .reported import Reported

log = logging.getLogger(__name__)

_ENC = msgspec.json.Encoder()
_REMEMBERED = 1000  # requests whose headers are kept


class Latency(msgspec.Struct, frozen=True):
    """Time to first event, time between events (0: as fast as the socket takes them), output length.

    Unpaced events go out one write each, as real servers write each token when their engine
    yields it; `batched` writes them all at once, which flatters a client (one read for a whole
    answer) and is kept only to show the difference.

    With a `slope`, the server slows under load as a real one's batch does: with more than `knee`
    answers in progress (itself included), ttft and gap each grow by `slope` times their value per
    answer beyond the knee, so that a load test has a highest load that meets an SLO to find."""

    ttft: float = 0.0
    gap: float = 0.0
    tokens: int = 16
    batched: bool = False
    knee: int = 0
    slope: float = 0.0

    def __post_init__(self) -> None:
        if self.knee < 0 or self.slope < 0:
            raise ValueError("the load knee and slope cannot be negative")

    def slowdown(self, in_progress: int) -> float:
        """How many times its ttft and gap an answer takes with `in_progress` answers under way."""
        return 1.0 + self.slope * max(0, in_progress - self.knee)


class FakeProvider:
    def __init__(self, latency: Latency | None = None, faults: FaultPlan | None = None,
                 prefix_cache: bool = False) -> None:  # fmt: skip
        self.latency = latency or Latency()
        self.faults = faults or FaultPlan()
        self.served: Counter[str] = Counter()
        self.bodies: Counter[str] = Counter()  # times each distinct request was served: a repeat ran twice
        self.conversations: Counter[str] = Counter()  # times each conversation was served (prefilled or not)
        self.arrivals: dict[str, list[float]] = {}  # when (time.monotonic()) each distinct request arrived
        self.answered = 0
        self.completed = 0
        self.disconnects = 0
        self.active = 0
        self.waiting = 0  # of the active streams, those before their first event
        self.chunks = 0  # stream events written, so that a load test's throughput can be counted here
        self.tokens = 0  # tokens of answers written to their end (never reset, as Prometheus counters)
        self.metrics = FakeMetrics(self)
        self.received: dict[str, dict[str, str]] = {}  # request id -> the headers it came with
        self.prefixes = PrefixCache() if prefix_cache else None  # prompts seen, so that usage reports cached tokens
        self.cached_tokens = 0  # input tokens answered from it
        self.reported = Reported()  # the usage its answers reported, summed
        self.clouds = CloudRoutes(self)  # Bedrock, Vertex and Azure, with their credential checks
        self.released = asyncio.Event()  # cleared while `/_isopool/hold` holds streams before their first event
        self.released.set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._endpoint(AnthropicMessages, "anthropic"))
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_post("/v1/chat/completions", self._endpoint(OpenAIChat, "openai"))
        app.router.add_post("/v1/responses", self._endpoint(OpenAIResponses, "openai"))
        app.router.add_get("/_isopool/stats", self.stats)
        app.router.add_post("/_isopool/reset", self.reset)
        app.router.add_post("/_isopool/hold", self.hold)
        app.router.add_get("/_isopool/requests/{rid}", self.request_headers)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics.handle)
        self.clouds.add_to(app)
        app.on_response_prepare.append(self._request_id)
        return app

    async def _request_id(self, request: web.Request, response: web.StreamResponse) -> None:
        """Both providers name each answer; the SDKs expose it as `_request_id`."""
        self.answered += 1
        rid = f"req_fake_{self.answered:08d}"
        response.headers["request-id"] = response.headers["x-request-id"] = rid
        self.received[rid] = {k.lower(): v for k, v in request.headers.items()}
        if len(self.received) > _REMEMBERED:
            del self.received[next(iter(self.received))]

    def _arrived(self, key: str) -> None:
        """Note an attempt's arrival, for tests that check how many came and how far apart."""
        self.arrivals.setdefault(key, []).append(time.monotonic())
        if len(self.arrivals) > _REMEMBERED:
            del self.arrivals[next(iter(self.arrivals))]

    async def request_headers(self, request: web.Request) -> web.Response:
        headers = self.received.get(request.match_info["rid"])
        return web.json_response(headers) if headers is not None else web.json_response({}, status=404)

    async def models(self, request: web.Request) -> web.Response:
        names = ["claude-fake", "gpt-fake"]
        data = [{"id": n, "object": "model", "type": "model", "created": 0, "owned_by": "fake"} for n in names]
        return web.json_response({"object": "list", "data": data, "has_more": False})

    def snapshot(self) -> dict[str, Any]:
        return {
            "served": dict(self.served),
            "faults": dict(self.faults.injected),
            "completed": self.completed,
            "disconnects": self.disconnects,
            "active": self.active,
            "chunks": self.chunks,
            "repeated": sum(n - 1 for n in self.bodies.values()),
            "cached_tokens": self.cached_tokens,
            "arrivals": self.arrivals,
            "signatures": self.clouds.signatures,
            "usage": dict(self.reported.totals),
        }

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def reset(self, request: web.Request) -> web.Response:
        self.released.set()
        self.served.clear()
        self.bodies.clear()
        self.conversations.clear()
        self.arrivals.clear()
        self.faults.reset()
        self.clouds.reset()
        if self.prefixes is not None:
            self.prefixes.clear()
        self.completed = self.disconnects = self.chunks = self.cached_tokens = 0
        self.reported.reset()
        return web.json_response({"ok": True})

    async def hold(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("hold"), bool):
            return web.json_response({"error": 'send {"hold": true} or {"hold": false}'}, status=400)
        (self.released.clear if body["hold"] else self.released.set)()
        return web.json_response({"hold": body["hold"]})

    async def count_tokens(self, request: web.Request) -> web.Response:
        return self.counted(await request.json(), "messages.count_tokens")

    def counted(self, body: dict, label: str) -> web.Response:
        self.served[label] += 1
        self.completed += 1
        return web.json_response({"input_tokens": Reply(body, 1).input_tokens})

    def _endpoint(self, fmt: Any, dialect: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                body = await request.json()
            except ValueError as exc:
                return error_response(dialect, 400, "invalid_request_error", str(exc))
            label = request.path.removeprefix("/v1/").replace("/", ".")
            return await self.answer(request, fmt, dialect, body, Sse(fmt), label)

        return handle

    async def answer(
        self, request: web.Request, fmt: Any, dialect: str, body: dict, framer: Any, label: str
    ) -> web.StreamResponse:
        """Answer a request of API `fmt` (its body already read and checked), with its faults, in the
        error shapes of `dialect` and the wire format of `framer`; counted as `label`."""
        try:
            latency = self._latency(request)
            prefill = prefill_text(body) if fmt is AnthropicMessages else None
            if prefill is not None:  # counted apart: a test can tell a continuation was prefilled
                refused = refusal(body)
                self.served[f"prefill.{'accepted' if refused is None else 'refused'}"] += 1
                if refused is not None:
                    return refused
            spec, said = request.headers.get(FAULT_HEADER), conversation(body)
            talk = body_key(said)
            serve = self.conversations[talk] if self.faults.varies(spec, str(said.get("model", ""))) else None
            reply = Reply(body, latency.tokens, self.prefixes, prefill, serve)
            self.cached_tokens += reply.cached_tokens
            fault = self.faults.choose(spec, reply.model, talk)
            self.conversations[talk] += 1
        except ValueError as exc:
            return error_response(dialect, 400, "invalid_request_error", str(exc))
        if fault is not None:
            self.faults.record(fault)
        stream = bool(body.get("stream"))
        self.served[f"{label}.{'stream' if stream else 'plain'}"] += 1
        self.bodies[reply.key] += 1
        self._arrived(reply.key)
        if fault is not None:
            if fault.kind == "no-headers":  # holds until the client leaves, having sent nothing
                await self._hold(request, fault, None, 0)
                return web.Response(status=499)
            if (answer := fault_response(dialect, request.path, fault, reply.input_tokens)) is not None:
                return answer
            reply.refused = fault.kind == "content-filter"
        if stream:
            return await self._stream(request, fmt, reply, body, latency, fault, framer)
        return await self._plain(request, fmt, reply, body, latency, fault)

    def _latency(self, request: web.Request) -> Latency:
        spec = request.headers.get(LATENCY_HEADER)
        if not spec:
            return self.latency
        fields = {**msgspec.structs.asdict(self.latency), **parse_params(spec)}
        try:
            return msgspec.convert(fields, Latency, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"bad {LATENCY_HEADER} header: {exc}") from None

    async def _plain(
        self, request: web.Request, fmt: Any, reply: Reply, body: dict, latency: Latency, fault: Fault | None
    ) -> web.StreamResponse:
        delay = (latency.ttft + latency.gap * reply.output_tokens) * latency.slowdown(self.active + 1)
        if fault is not None:
            if fault.stalls:
                await self._hold(request, fault, None, 0)
                return web.Response(status=499)
            if fault.kind in ("reset", "close"):
                _drop(request, reset=fault.kind == "reset")
                return web.Response(status=499)
            delay += fault.delay if fault.kind == "slow-first" else 0.0
        if delay:
            self.active += 1
            try:
                await _sleep(request, delay)
            except ConnectionError:
                self.disconnects += 1
                return web.Response(status=499)
            finally:
                self.active -= 1
        self.completed += 1
        self.tokens += reply.output_tokens
        final = fmt.final(reply, body)
        self.reported.answered(reply, [(None, final)])
        return web.Response(body=_ENC.encode(final), content_type="application/json")

    async def _stream(
        self, request: web.Request, fmt: Any, reply: Reply, body: dict, latency: Latency, fault: Fault | None,
        framer: Any,
    ) -> web.StreamResponse:  # fmt: skip
        arrived = asyncio.get_running_loop().time()
        raw = shaped(fmt, fmt.events(reply, body), fault)
        events = [framer.event(name, data) for name, data in raw]
        response = web.StreamResponse(headers={"content-type": framer.content_type, "cache-control": "no-cache"})
        cut = len(events)
        if fault is not None and fault.kind in (
            "stall-ping",
            "stall-comment",
            "silent",
            "reset",
            "close",
            "error-event",
        ):
            cut = min(fault.before, len(events) - 1)
        elif fault is not None and fault.kind == "stall-first":
            cut = 0
        gap = fault.gap if fault is not None and fault.kind == "drip" else latency.gap
        self.active += 1
        first_wait = latency.ttft * latency.slowdown(self.active)
        first_wait += fault.delay if fault is not None and fault.kind == "slow-first" else 0.0
        try:
            await response.prepare(request)  # a client already gone fails here: counted below, not logged
            if cut:
                await self._first_wait(request, first_wait, arrived)
            await self._write_events(request, response, events[:cut], gap, latency)
            self.reported.answered(reply, raw[:cut])
            if cut < len(events):
                await self._misbehave(request, response, framer, fault, cut)  # type: ignore[arg-type]
            elif fault is None or fault.kind != "cut":
                self.completed += 1
                self.tokens += reply.output_tokens
            if fault is not None and fault.kind == "no-done" and fault.open:
                await self._hold(request, fault, None, cut, framer)
        except ConnectionError:  # the client went away (a watchdog kill, a cancel): normal here
            self.disconnects += 1
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        finally:
            self.active -= 1
        return response

    async def _first_wait(self, request: web.Request, seconds: float, arrived: float) -> None:
        """Wait while held, then the time to first token, counted as waiting, and observed from the stream's arrival."""
        if seconds or not self.released.is_set():
            self.waiting += 1
            try:
                while not self.released.is_set():
                    await _sleep(request, 0.05)
                await _sleep(request, seconds)
            finally:
                self.waiting -= 1
        self.metrics.ttft.observe(asyncio.get_running_loop().time() - arrived)

    async def _write_events(
        self, request: web.Request, response: web.StreamResponse, events: list[bytes], gap: float, latency: Latency
    ) -> None:
        """One write per event, with a turn of the event loop (or the gap, slowed by the load) between
        two, so that concurrent streams interleave and each event reaches the socket in its own send."""
        if latency.batched and not gap:
            if events:
                await response.write(b"".join(events))
                self.chunks += len(events)
            return
        for i, event in enumerate(events):
            if i:
                await (_sleep(request, gap * latency.slowdown(self.active)) if gap else asyncio.sleep(0))
            await response.write(event)  # drains (waits for a slow reader) every 64 KiB, as aiohttp does
            self.chunks += 1

    async def _misbehave(
        self, request: web.Request, response: web.StreamResponse, framer: Any, fault: Fault, sent: int
    ) -> None:
        if fault.kind == "error-event":
            await response.write(framer.error(fault))
        elif fault.kind in ("reset", "close"):
            _drop(request, reset=fault.kind == "reset")
        else:
            await self._hold(request, fault, response, sent, framer)

    async def _hold(
        self, request: web.Request, fault: Fault, response: web.StreamResponse | None, sent: int, framer: Any = None
    ) -> None:
        """Keep the connection open, sending keep-alives as the fault says, until the client leaves."""
        keepalive = framer.keepalive(fault) if response is not None else b""
        loop = asyncio.get_running_loop()
        until = loop.time() + fault.hold
        step = min(fault.interval, 0.1) if not keepalive else fault.interval
        next_ping = loop.time() + fault.interval
        while loop.time() < until:
            transport = request.transport
            if transport is None or transport.is_closing():
                self.disconnects += 1  # the client gave up on the stall, as it should
                return
            if keepalive and loop.time() >= next_ping:
                await response.write(keepalive)  # type: ignore[union-attr]
                next_ping += fault.interval
            await asyncio.sleep(step)


async def _sleep(request: web.Request, seconds: float) -> None:
    """Sleep, but notice within 0.1 s that the client went away (so no stream outlives its client)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while (left := until - loop.time()) > 0:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        await asyncio.sleep(min(left, 0.1))


def _drop(request: web.Request, reset: bool) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if reset and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort() if reset else transport.close()
