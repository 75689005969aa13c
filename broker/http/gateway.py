"""The HTTP gateway: Anthropic- and OpenAI-compatible endpoints that run through the pool.

Any program that takes a `base_url` gets stall-proof calls by pointing it here:

    anthropic.Anthropic(base_url="http://127.0.0.1:8787")
    openai.OpenAI(base_url="http://127.0.0.1:8787/v1")

Each request is sent on as the caller made it (its credentials dropped: the worker adds
the pool's key), to the profile named by an `x-isopool-profile` header, else to the
default Anthropic profile for `/v1/messages…` and requests carrying `anthropic-version`,
else to the default OpenAI one. A request in a cloud's own form (Bedrock's `/model/…`,
Vertex's `/v1/projects/…`, Azure's `/openai/…`) goes to that cloud's profile and is answered
in its wire form (cloudforms.py). Streams are relayed as they arrive, the events that came
together in one write.
Retryable failures were retried by the pool within the call's budget (broker/server/retrypolicy.py);
an error answer says `x-should-retry: false`, so that a caller's SDK does not retry it again.

It is a server on a developer's laptop, so it trusts no caller:
- Without a token it answers only to loopback names in `Host` (a web page that rebinds its
  own name to 127.0.0.1 still sends that name); bound elsewhere it requires a token.
  The token (`gateway_token`, `gateway_token_file`, or `auto`: made and printed at start)
  is the caller's API key, never the provider's.
- A request from a browser (an `Origin` header) is refused unless `gateway_origins` lists
  its origin; those get CORS answers.
- A body is capped at the pool's `max_message_bytes` (413), must be a JSON object when it
  says it is JSON (400), and must arrive, like the headers, within `gateway_read_timeout`.
  A path with dot segments or backslashes, however encoded, is refused (400); one outside the APIs served
  is a 404, a CORS preflight's too; an `Expect` other than `100-continue` is a 417.
- A header value that goes on, or that the gateway reads, must be UTF-8 text (400), as the SDKs send it.
- Only the headers a provider reads go on (an allowlist), and a caller that leaves before
  its answer is complete cancels its pool call.

It runs as a child of the broker (`python -P -m broker.http.gateway`), a client of its
frontend, reads the broker's settings as one JSON line on stdin, and exits when the
broker closes its stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import hmac
import logging
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import HttpVersion11, web

from ..client.client import AsyncCall, AsyncClient, CallLimits, StreamEvent, sse
from ..client.fallbacks import HEADER as FALLBACKS_HEADER
from ..client.fallbacks import BadFallbacks, take_fallbacks
from ..config import FAMILIES, Settings, is_loopback
from ..endpoints import cannot_listen, http_url, listen_address
from ..errors import (
    AttemptsExhausted,
    BadRequest,
    DeadlineExceeded,
    IsopoolError,
    PoolSaturated,
    RateLimited,
    ShuttingDown,
    StreamStalled,
)
from ..processes import say_ready
from ..protocol import HttpCall, Listening, Served, path_problem, without_bearer
from . import cloudforms

log = logging.getLogger(__name__)
PROFILE_HEADER = "x-isopool-profile"
# The request headers a provider reads, from what the anthropic and openai SDKs send
# (content type, accept, user agent, `anthropic-version`/`-beta`/`-workspace-id`,
# `openai-organization`/`-project`/`-beta`, `x-stainless-*`) and the fake provider's
# `x-isopool-fault`/`-latency`. Everything else stays here: hop-by-hop and framing
# headers, cookies, proxies' `X-Forwarded-*`, and the caller's credentials.
FORWARDED = frozenset({"accept", "content-type", "user-agent", "idempotency-key"})
FORWARDED_PREFIXES = ("anthropic-", "openai-", "x-stainless-", "x-isopool-", "x-amzn-bedrock-")
_KEPT = (PROFILE_HEADER, FALLBACKS_HEADER)  # the gateway's own, under a forwarded prefix
# Anthropic's error type per status of the gateway's own refusals; OpenAI uses invalid_request_error for all.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    417: "invalid_request_error",
    503: "overloaded_error",
}
# On an error answer after the pool's own retries: the caller's SDK (at its default max_retries) would
# otherwise retry each 429/5xx again, multiplying the attempts. The SDKs obey this header.
_NOT_AGAIN = (("x-should-retry", "false"),)
# The paths served: the APIs' own (Anthropic's, OpenAI's, Vertex's `/v1/projects/…`), Bedrock's and Azure's.
ROOTS = ("/v1/", "/model/", "/openai/")
_HOST = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(:\d{1,5})?")
_ENC = msgspec.json.Encoder()
_JSON_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])  # checks the whole body, builds only its top level
_MSGPACK = msgspec.msgpack.Encoder()


class Refused(Exception):
    """A request the gateway answers itself, before anything reaches the pool; the message says what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


JsonTop = dict[str, msgspec.Raw] | None  # a JSON body's top level, each value as it came


class Bodies:
    """The request bytes the gateway holds at once, from the first byte read to the pool taking them,
    within the broker's own queue_bytes_limit. Counted as they arrive (a gzip body's as decoded), not as
    declared: 30 callers each sending most of a large body and holding back its last byte took the gateway
    to half a GB, and counting a declared Content-Length let a few callers sending headers only lock
    everyone out. Past the budget a request gets a 503 (its connection closed), which the SDKs retry after
    a backoff."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def share(self) -> BodyShare:
        return BodyShare(self)


class BodyShare:
    """One request's part of the gateway's Bodies: taken as its body is read, given back in one go."""

    __slots__ = ("bodies", "size")

    def __init__(self, bodies: Bodies) -> None:
        self.bodies, self.size = bodies, 0

    def take(self, size: int) -> None:
        bodies = self.bodies
        if bodies.held + size > bodies.limit:
            raise Refused(503, f"the gateway holds {bodies.held} bytes of request bodies not yet in the pool "
                               f"(queue_bytes_limit {bodies.limit}): retry shortly")  # fmt: skip
        bodies.held += size
        self.size += size

    def release(self) -> None:
        self.bodies.held -= self.size
        self.size = 0


class Gateway:
    def __init__(self, client: AsyncClient, settings: Settings, token: str = "") -> None:
        self.client = client
        self.bodies = Bodies(settings.queue_bytes_limit)
        self.token = token
        # its callers' usage is accounted to the token, named by a short hash of it (never the token)
        self.caller = f"token:{hashlib.blake2b(token.encode(), digest_size=4).hexdigest()}" if token else ""
        self.max_bytes = settings.max_message_bytes
        self.read_timeout = settings.gateway_read_timeout
        self.origins = {o.strip().rstrip("/").lower() for o in settings.gateway_origins.split(",") if o.strip()}
        self.defaults = {kind: settings.default_profile(kind) for kind in FAMILIES}

    def server(self, **options: Any) -> web.Server:
        """aiohttp's low-level server (no application, router or signals, which cost a call a good part of
        the gateway's time): `handle` takes every request. `options` go to aiohttp's RequestHandler."""
        return web.Server(self.handle, request_factory=self._request, **options)

    def _request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        loop = asyncio.get_running_loop()
        request = _Request(message, payload, protocol, writer, task, loop, client_max_size=self.max_bytes)
        request.origins = self.origins
        return request

    def route(self, request: web.BaseRequest) -> tuple[str, str, str]:
        """(profile, kind, path relative to that kind's base URL): a cloud's own form goes to that
        cloud's profile, a first-party one to the SDK's."""
        path = request.raw_path  # as sent, query included: a Bedrock model ARN's `%2F` stays one
        if cloud := cloudforms.cloud_form(request.rel_url.raw_path, path):
            kind, relative = cloud
        elif request.path.startswith("/v1/messages") or "anthropic-version" in request.headers:
            kind, relative = "anthropic", path
        else:
            kind, relative = "openai", path.removeprefix("/v1")
        return request.headers.get(PROFILE_HEADER) or self.defaults[kind], kind, relative

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request: an answer, the pool's or the gateway's own refusal, with CORS headers for an allowed
        browser origin (added as the answer is prepared, by `_Request`)."""
        profile, kind, path = self.route(request)
        submitted = await self.submit(request, profile, kind, path)
        if isinstance(submitted, web.StreamResponse):
            return submitted
        return await self.relay(request, kind, submitted, _closing(kind, path))

    async def submit(self, request: web.BaseRequest, profile: str, kind: str, path: str) -> AsyncCall | web.Response:
        """The request, checked, read and handed to the pool, or the answer that refuses it. Its body is held
        within the bodies' budget until the pool has it, and not after (the relay keeps none of it)."""
        share = self.bodies.share()
        try:
            self.check_caller(request)
            if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
                check_served(request.path)  # a browser carries no credentials on a preflight
                check_path(request.raw_path)
                return _preflight(request)
            self.check_token(request)
            check_served(request.path)
            check_path(request.raw_path)
            check_text(request)
            if problem := cloudforms.query_problem(kind, path):
                raise Refused(400, problem)
            body, top = await self.read_body(request, share)
            try:
                body, fallbacks, fields = take_fallbacks(request.headers, body, top)
            except BadFallbacks as exc:
                raise Refused(400, str(exc)) from None
            call = HttpCall(request.method, path, _forwarded(request), body)
            if _encoded_size(call) > self.max_bytes:
                raise Refused(413, f"the request is over the pool's max_message_bytes ({self.max_bytes} bytes)")
            limits = CallLimits(fallbacks=fallbacks, traceparent=_traceparent(request), caller=self.caller)
            return await self.client.submit_http(profile, call, limits, fields)
        except Refused as exc:
            return _refusal(kind, exc, request)
        except IsopoolError as exc:
            return _pool_error(kind, exc)
        finally:
            share.release()

    def check_caller(self, request: web.BaseRequest) -> None:
        """Without a token, only loopback names (a rebinding page sends its own); browsers only from gateway_origins."""
        if not self.token and not names_loopback(request.headers.get("host", "")):
            raise Refused(
                403,
                "without a token this gateway answers only to 127.0.0.1, localhost or [::1]: use one of those "
                "names, or set gateway_token (or gateway_token_file) to reach it under others",
            )
        origin = request.headers.get("origin")
        if origin is not None and origin.lower() not in self.origins:
            raise Refused(403, f"browser origin {origin!r} is not allowed: list it in gateway_origins to let it in")

    def check_token(self, request: web.BaseRequest) -> None:
        if not self.token:
            return
        headers = request.headers
        offered = headers.get("x-api-key") or headers.get("api-key") or without_bearer(headers.get("authorization", ""))
        offered_bytes = offered.encode(errors="surrogateescape")  # as it came, whatever it is
        if not hmac.compare_digest(offered_bytes, self.token.encode()):
            raise Refused(
                401,
                "this gateway needs its own gateway token (gateway_token; printed at start for `auto`) "
                "as the API key (x-api-key, api-key or Authorization: Bearer), not a provider's key",
            )

    async def read_body(self, request: web.BaseRequest, share: BodyShare) -> tuple[bytes, JsonTop]:
        """The whole body, within max_message_bytes, gateway_read_timeout and the gateway's budget for bodies
        (`share` of it, taken as it arrives); a JSON one must be an object, whose top level comes with it
        (read once: fallbacks and the broker's fields are taken from it). A caller that holds it back for a
        `100 Continue` is told to send it here, once its headers passed every check. Read from the payload,
        not by `request.read()`, which would keep it for the request's life (a long stream's relay)."""
        too_large = Refused(413, f"the request body is over the pool's max_message_bytes ({self.max_bytes} bytes)")
        if (request.content_length or 0) > self.max_bytes:
            raise too_large
        if "expect" in request.headers:
            await _expectation(request)
        content, parts, size = request.content, [], 0
        try:  # no timer when all of it came with the headers: nothing to wait for
            async with asyncio.timeout(None if content.is_eof() else self.read_timeout):
                while chunk := await content.readany():
                    size += len(chunk)
                    if size > self.max_bytes:  # decoded: a gzip body is as large as it unpacks
                        raise too_large
                    share.take(len(chunk))
                    parts.append(chunk)
        except TimeoutError:
            late = f"the request body took longer than gateway_read_timeout ({self.read_timeout:g} s)"
            raise Refused(408, late) from None
        body = b"".join(parts)
        if body and (request.content_type == "application/json" or request.content_type.endswith("+json")):
            try:
                return body, _JSON_OBJECT.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:  # msgspec's: too deep
                raise Refused(400, f"the request body is not a JSON object: {exc}") from None
        return body, None

    async def relay(self, request: web.BaseRequest, kind: str, call: AsyncCall, closing: bytes) -> web.StreamResponse:
        """Answer with the call's result or stream. A stream goes out a batch at a time (the events that
        arrived together, in one write), the headers with the first batch and the end with the last: a
        complete stream's `closing` (the workers drop OpenAI's `[DONE]`), a failed one's error event. The
        server cancels this handler when the caller leaves (handler_cancellation): the call is then
        cancelled in the pool."""
        try:
            events = await call.batch()
            if not events:
                try:
                    result = await call.result()
                except IsopoolError as exc:
                    return _pool_error(kind, exc)
                headers = [*result.headers, *_NOT_AGAIN] if result.status >= 400 else result.headers
                return web.Response(status=result.status, headers=[*headers, *_served(call.served)], body=result.body)
            head = call.head
            headers = [*head.headers, *_served(call.served)]  # type: ignore[union-attr]
            encode = _encoder(kind)
            if kind == "bedrock":  # its SDK reads event-stream frames only
                headers = [(k, v) for k, v in headers if k.lower() != "content-type"] + [*cloudforms.STREAM_HEADERS]
            response = _Relayed(status=head.status, headers=headers)  # type: ignore[union-attr]
            await response.prepare(request)
            while not call.ended:
                await response.write(encode(events))
                events = await call.batch()
            try:
                await call.result()
                end = closing if kind == "bedrock" else _continued(call.served) + closing
            except IsopoolError as exc:  # after output: say it in the stream, as the provider would
                end = _error_event(kind, exc)
            await response.write_eof(encode(events) + end)
            return response
        finally:
            if not call.ended:
                await call.cancel()


class _Request(web.BaseRequest):
    """A request to the gateway: its answer says `access-control-allow-origin` to an allowed browser origin."""

    origins: set[str] = set()

    async def _prepare_hook(self, response: web.StreamResponse) -> None:  # aiohttp calls it as an answer starts
        origin = self.headers.get("origin")
        if origin is not None and origin.lower() in self.origins:
            response.headers["access-control-allow-origin"] = origin
            response.headers.add("vary", "Origin")


async def _expectation(request: web.BaseRequest) -> None:
    """Let a caller that waits for it before sending its body (curl's `Expect: 100-continue`) send it; refuse
    any other expectation (417, RFC 9110 §10.1.1) rather than run a request whose caller expects what it won't get.
    The header is a list, its lines one list and its empty elements none (RFC 9110 §5.3, §5.6.1)."""
    expect = ", ".join(request.headers.getall("expect"))
    expected = {element.strip().lower() for element in expect.split(",")} - {""}
    if expected - {"100-continue"}:
        raise Refused(417, f"Expect: {expect!r} cannot be met: this gateway knows only 100-continue; drop the header")
    if expected and request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's size is counted from its own start


def check_served(path: str) -> None:
    """Refuse a path outside the APIs served (an SDK's base_url missing its `/v1`, say), naming those."""
    if not path.startswith(ROOTS):
        served = "/v1/… (Anthropic, OpenAI, Vertex), /model/… (Bedrock) and /openai/… (Azure)"
        raise Refused(404, f"no API at {path}: this gateway serves {served}; check the base_url")


@functools.lru_cache(maxsize=64)  # a caller sends the same Host on every request
def names_loopback(host: str) -> bool:
    """Whether a Host header names loopback (127.0.0.1, localhost, [::1]), with or without a port."""
    match = _HOST.fullmatch(host)
    return match is not None and is_loopback(match[1].lower())


def check_path(raw: str) -> None:
    """Refuse a path that could leave the API's root (the workers refuse it too; here before the pool)."""
    if problem := _path_problem(raw):
        raise Refused(400, problem)


def _forwarded(request: web.BaseRequest) -> list[tuple[str, str]]:
    return [(name, v) for k, v in request.headers.items() if (name := _forwarded_name(k))]


def check_text(request: web.BaseRequest) -> None:
    """Refuse a header that goes on, or that the gateway reads itself, whose value is not UTF-8 (aiohttp keeps
    such bytes as surrogates): the SDKs send text as UTF-8, and the pool's messages carry text."""
    not_text = [str(k) for k, v in request.headers.items() if not v.isascii() and _is_read(k) and not _is_utf8(v)]
    if not_text:
        raise _not_text(not_text)


def _not_text(names: list[str]) -> Refused:
    return Refused(400, f"header {', '.join(names)}: its value is not UTF-8 text; send it as UTF-8")


def _is_read(name: str) -> bool:
    """Whether a header is read past the gateway's checks: by the provider (it goes on) or the gateway itself."""
    lower = name.lower()
    return lower in FORWARDED or lower.startswith(FORWARDED_PREFIXES)


def _is_utf8(value: str) -> bool:
    """Whether a header value aiohttp read came as UTF-8 (one that did not holds its bytes as surrogates)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


@functools.lru_cache(maxsize=256)  # an SDK sends the same header names on every request
def _forwarded_name(name: str) -> str:
    """The header's name as a plain `str` (aiohttp's are `istr`, which the wire cannot carry) if it goes
    on to the provider, else ""."""
    return str(name) if _is_read(name) and name.lower() not in _KEPT else ""


def _closing(kind: str, path: str) -> bytes:
    """What ends a complete stream of this endpoint: `data: [DONE]` for OpenAI's (and Azure's) Chat
    Completions and Completions, as OpenAI sends it (some clients wait for it); nothing for the others."""
    route = path.partition("?")[0].rstrip("/")
    ends = route.endswith(("/chat/completions", "/completions"))  # Azure's: under /deployments/NAME
    return b"data: [DONE]\n\n" if FAMILIES[kind] == "openai" and ends else b""


class _Relayed(web.StreamResponse):
    """A relayed stream, whose headers go out with its first write (aiohttp's `Response` does so too)."""

    _send_headers_immediately = False


def _encoder(kind: str) -> Callable[[list[StreamEvent]], bytes]:
    """How relayed events are written: SSE, or a Bedrock caller's event-stream frames."""
    return cloudforms.frames if kind == "bedrock" else sse


def _encoded_size(call: HttpCall) -> int:
    """The call's size on the wire, as the broker measures it (the body counted, not copied)."""
    return len(_MSGPACK.encode(msgspec.structs.replace(call, body=b""))) + len(call.body) + 4


_path_problem = functools.lru_cache(maxsize=256)(path_problem)  # a caller sends the same few paths
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def _traceparent(request: web.BaseRequest) -> str:
    """The caller's W3C trace context, if it sent a well-formed one (the pool's spans go under it)."""
    value = request.headers.get("traceparent")
    if not value:
        return ""
    value = value.strip().lower()
    return value if _TRACEPARENT.fullmatch(value) else ""


def _preflight(request: web.BaseRequest) -> web.Response:
    """A browser's CORS check from an allowed origin (Allow-Origin is added to every answer to it); the headers
    it asks for are echoed, as UTF-8 text only (see `check_text`)."""
    asked = request.headers.get("access-control-request-headers", "")
    if not asked.isascii() and not _is_utf8(asked):
        raise _not_text(["Access-Control-Request-Headers"])
    headers = {
        "access-control-allow-methods": "GET, POST, DELETE",
        "access-control-allow-headers": asked,
        "access-control-max-age": "600",
    }
    return web.Response(status=204, headers=headers)


def _status(exc: IsopoolError) -> tuple[int, str]:
    if isinstance(exc, StreamStalled | AttemptsExhausted | DeadlineExceeded):
        return 504, "timeout_error"
    if isinstance(exc, RateLimited):
        return 429, "rate_limit_error"
    if isinstance(exc, PoolSaturated | ShuttingDown):
        return 503, "overloaded_error"
    if isinstance(exc, BadRequest):
        return 400, "invalid_request_error"
    return 502, "api_error"


def _error(kind: str, status: int, kind_name: str, message: str) -> web.Response:
    headers: list[tuple[str, str]] = []
    if kind == "bedrock":
        body, headers = cloudforms.bedrock_error(status, message)
    elif FAMILIES[kind] == "anthropic":
        body = {"type": "error", "error": {"type": kind_name, "message": message}}
    else:
        body = {"error": {"type": kind_name, "message": message, "code": None, "param": None}}
    return web.Response(status=status, body=_ENC.encode(body), content_type="application/json", headers=headers)


def _refusal(kind: str, exc: Refused, request: web.BaseRequest) -> web.Response:
    name = _ANTHROPIC_TYPES[exc.status] if FAMILIES[kind] == "anthropic" else "invalid_request_error"
    response = _error(kind, exc.status, name, f"isopool gateway: {exc}")
    if exc.status in (408, 413, 417, 503) or ("expect" in request.headers and not request.content.is_eof()):
        # the answer says the connection ends: the rest of a stalled body, of one over a limit (413, 503), of one sent
        # with no answer expected, or of one held back for a 100 Continue never sent is not to come (nor the
        # caller's next request be read as it)
        response.force_close()
    return response


def _continued(served: Served | None) -> bytes:
    """A stream that broke and was continued (its headers had gone) says so at its end, in an SSE
    comment line, which every SSE parser skips."""
    if served is None or served.rescue not in ("prefill", "replay"):
        return b""
    return f": isopool continued ({served.rescue})\n\n".encode()


def _served(served: Served | None) -> list[tuple[str, str]]:
    """Who answered, as `x-isopool-*` response headers."""
    return served.headers() if served is not None else []


def _pool_error(kind: str, exc: IsopoolError) -> web.Response:
    status, name = _status(exc)
    response = _error(kind, status, name, f"isopool: {exc}")
    response.headers.extend(_served(getattr(exc, "served", None)))
    if not isinstance(exc, PoolSaturated | ShuttingDown):  # the pool's retries are spent: the SDK's would add to them
        response.headers.extend(_NOT_AGAIN)
    return response


def _error_event(kind: str, exc: IsopoolError) -> bytes:
    status, name = _status(exc)
    if kind == "bedrock":
        return cloudforms.exception_frame(f"isopool: {exc}", timeout=status == 504)
    if FAMILIES[kind] == "anthropic":
        data = _ENC.encode({"type": "error", "error": {"type": name, "message": f"isopool: {exc}"}})
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + _ENC.encode({"error": {"type": name, "message": f"isopool: {exc}"}}) + b"\n\n"


def gateway_token(settings: Settings) -> str:
    """The token callers must present: gateway_token, the content of gateway_token_file, or, for
    `auto`, one made now and printed on stderr (where `isopool serve` shows it)."""
    if settings.gateway_token_file:
        try:
            token = Path(settings.gateway_token_file).read_text().strip()
        except OSError as exc:
            raise SystemExit(f"isopool gateway: cannot read gateway_token_file: {exc}") from None
        if not token:
            raise SystemExit(f"isopool gateway: gateway_token_file {settings.gateway_token_file} is empty")
        return token
    if settings.gateway_token == "auto":
        token = secrets.token_urlsafe(24)
        print(f"isopool gateway token: {token} (made at start; callers send it as their API key)", file=sys.stderr)
        return token
    return settings.gateway_token


async def serve(url: str, host: str, port: int, settings: Settings) -> None:
    """Serve until stdin closes (the broker that owns this process stopped or died)."""
    token = gateway_token(settings)
    if not is_loopback(host) and not token:
        raise SystemExit(f"refusing to expose the gateway on {host} without a gateway_token")
    async with AsyncClient(url) as client:
        # keepalive_timeout: aiohttp closes a connection whose next request has not sent all its headers
        # this long after the connection opened or its last answer: the headers' read limit.
        server = Gateway(client, settings, token).server(
            access_log=None, handler_cancellation=True, keepalive_timeout=settings.gateway_read_timeout
        )
        runner = web.ServerRunner(server)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise cannot_listen("gateway", host, port, exc) from None
        bound = runner.addresses[0]
        say_ready(_ENC.encode(Listening(http_url(host, bound[1]))).decode())
        loop = asyncio.get_running_loop()
        closed = asyncio.Event()
        loop.add_reader(sys.stdin.fileno(), lambda: closed.set() if not sys.stdin.buffer.read1(4096) else None)
        await closed.wait()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="isopool's HTTP gateway (started by `isopool serve --http`)")
    parser.add_argument("--url", required=True, help="the broker's frontend")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args()
    host, port = listen_address(args.listen)
    # The broker's settings come on stdin (with the token: never on the command line).
    settings = msgspec.json.decode(sys.stdin.buffer.readline(), type=Settings)
    asyncio.run(serve(args.url, host, port, settings))


if __name__ == "__main__":
    main()
