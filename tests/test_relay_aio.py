"""worker/aio.py: a relayed request sent by aiohttp is the one the SDK's own client would send, and its
answer reads as that client's would (status, headers, decoded body, errors), against a raw upstream
that records the bytes it is sent and answers bytes a test scripts."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import httpx
import pytest

from broker.protocol import Code, HttpCall
from broker.sdklib import library
from worker import aio
from worker.errors import translate
from worker.exchange import request_headers

HTTP = library("anthropic")
GZ_BODY = gzip.compress(b'{"input_tokens": 7}')
SSE = b'event: message_stop\ndata: {"type": "message_stop"}\n\n'
GZ_SSE = gzip.compress(SSE * 3)


def _chunked(body: bytes, size: int = 20) -> bytes:
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


ANSWERS = {
    # repeated and mixed-case headers, a gzip body with its length
    "json": b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-Mixed-Case: Yes\r\nContent-Type: application/json\r\n"
    b"set-cookie: b=2\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(GZ_BODY) + GZ_BODY,
    "gzip stream": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(GZ_SSE),
    "error": b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 15\r\n\r\n{"error": "no"}',
}


class Upstream:
    """A raw HTTP/1.1 server on the test's loop: records each request's bytes, answers `answer` (bytes), or
    runs it (a coroutine function of the reader and writer) for what a well-formed answer cannot show."""

    def __init__(self, answer: bytes | Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]) -> None:
        self.answer, self.seen, self.connections = answer, [], 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                self.seen.append(head + await reader.readexactly(length))
                if callable(self.answer):
                    await self.answer(reader, writer)
                    break
                writer.write(self.answer)
                await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        async with server:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _request(http: Any, url: str, **extra: Any) -> Any:
    headers = {"X-Api-Key": "k", "anthropic-version": "2023-06-01", "Content-Type": "application/json", "x-Odd": "1"}
    return http.build_request("POST", url + "/v1/models/a%3Ab/count_tokens?beta=true", headers=headers,
                              content=b'{"model": "m"}', **extra)  # fmt: skip


@contextlib.asynccontextmanager
async def _clients() -> AsyncIterator[tuple[Any, aio.Session]]:
    """The SDK's HTTP client and a worker's aiohttp session, closed on the way out."""
    http, session = anthropic.DefaultAsyncHttpxClient(), aio.Session(None, "anthropic")
    try:
        yield http, session
    finally:
        await session.close()
        await http.aclose()


async def _both(answer: bytes, read: Callable[[Any], Any], omit: str = "") -> tuple[list[Any], list[bytes]]:
    """What `read` makes of the answer through the SDK's client, then through aiohttp; the requests sent
    (without the header `omit`)."""
    upstream, got = Upstream(answer), []
    async with upstream.running() as url, _clients() as (http, session):
        first, second = _request(http, url), _request(http, url)
        for request in (first, second):
            request.headers.pop(omit, None)
        for response in (await http.send(first, stream=True), await aio.send(session, http, aio.Outgoing.of(second))):
            try:
                got.append(await read(response))
            finally:
                await response.aclose()
    return got, upstream.seen


@pytest.mark.parametrize("omit", ["", "content-type"])
def test_the_upstream_receives_the_bytes_the_sdk_client_would_send(omit):
    """Method, encoded URL, every header in its case and order (none added, none lost), body; a body
    without a content type is sent without one."""
    _, seen = asyncio.run(_both(ANSWERS["error"], lambda r: r.aread(), omit))
    assert len(seen) == 2
    assert seen[1] == seen[0], (seen[0], seen[1])


@pytest.mark.parametrize("answer", ["json", "gzip stream", "error"])
def test_the_answer_reads_as_the_sdk_clients(answer):
    """Status; headers as the SDK's client gives them (lower-cased, a repeated one joined in order: what
    the relay sends today); the body decoded, read whole or as it comes."""

    async def read(response: Any) -> Any:
        body = (
            await response.aread() if answer != "gzip stream" else b"".join([c async for c in response.aiter_bytes()])
        )
        return response.status_code, list(response.headers.items()), response.headers.get("content-type"), body

    (through_sdk, through_aio), _ = asyncio.run(_both(ANSWERS[answer], read))
    assert through_aio == through_sdk
    if answer == "json":
        assert ("set-cookie", "a=1, b=2") in through_aio[1] and through_aio[3] == b'{"input_tokens": 7}'


async def _code(answer: Any, timeout: float | None = None) -> list[str]:
    """The error code each client's failure translates to (worker/errors.py), reading the answer whole."""
    extra, codes = {"timeout": HTTP.Timeout(timeout)} if timeout else {}, []
    async with Upstream(answer).running() as url, _clients() as (http, session):
        if answer is None:  # a port nobody listens on
            url = url.rsplit(":", 1)[0] + ":9"
        for send in (lambda r: http.send(r, stream=True), lambda r: aio.send(session, http, aio.Outgoing.of(r))):
            try:
                response = await send(_request(http, url, **extra))
                try:
                    await response.aread()
                finally:
                    await response.aclose()
            except Exception as exc:
                codes.append(translate(exc).code)
            else:
                codes.append("no error")
    return codes


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # until the client gives up


async def _cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nda")
    await writer.drain()
    writer.transport.abort()


def test_a_body_read_to_its_end_keeps_its_connection_and_one_left_unread_closes_it():
    """Keep-alive between relayed calls; a stream closed early (a cancelled call) is cut at the upstream."""
    gone = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await reader.read()  # until the client closes the connection
        gone.set()

    async def run() -> None:
        for answer in (ANSWERS["json"], endless):
            upstream = Upstream(answer)
            async with upstream.running() as url, _clients() as (http, session):
                for _ in range(2 if answer is endless else 3):
                    response = await aio.send(session, http, aio.Outgoing.of(_request(http, url)))
                    await (response.aiter_bytes().__anext__() if answer is endless else response.aread())
                    await response.aclose()
                    if answer is endless:
                        await asyncio.wait_for(gone.wait(), 5)
                        gone.clear()
            assert upstream.connections == (2 if answer is endless else 1)

    asyncio.run(run())


@pytest.mark.parametrize(
    ("fault", "answer", "timeout", "code"),
    [
        ("refused", None, None, Code.PROVIDER_CONNECTION),
        ("no headers within the read timeout", _silent, 0.3, Code.PROVIDER_TIMEOUT),
        ("reset mid-body", _cut, None, Code.PROVIDER_CONNECTION),
    ],
)
def test_failures_translate_as_the_sdk_clients_do(fault, answer, timeout, code):
    assert asyncio.run(_code(answer, timeout)) == [code, code], fault


def test_a_request_aiohttp_cannot_send_as_the_sdk_client_would_goes_by_that_client(monkeypatch):
    """An HTTP proxy is honoured by aiohttp (the request goes to it, in absolute form); a SOCKS proxy,
    or an encoding aiohttp cannot decode, leaves the request to the SDK's client."""

    async def run() -> list[Any]:
        proxy, sent_by = Upstream(ANSWERS["error"]), []
        async with proxy.running() as proxy_url, _clients() as (http, session):
            sdk_send = http.send
            try:
                for env, encoding in ((proxy_url, "gzip"), ("socks5://127.0.0.1:9", "gzip"), ("", "gzip, snappy")):
                    monkeypatch.setenv("HTTP_PROXY", env)
                    aio.proxy_for.cache_clear()
                    request = _request(http, "http://upstream.invalid")
                    request.headers["accept-encoding"] = encoding
                    sent: list[Any] = []

                    def counted(request: Any, stream: bool, sent: list[Any] = sent) -> Any:
                        sent.append(request)
                        return sdk_send(request, stream=stream)

                    monkeypatch.setattr(http, "send", counted)
                    with contextlib.suppress(HTTP.ConnectError):  # the SDK's client finds no upstream.invalid
                        response = await aio.send(session, http, aio.Outgoing.of(request))
                        await response.aclose()
                    sent_by.append("sdk" if sent else "aiohttp")
            finally:
                aio.proxy_for.cache_clear()
        assert proxy.seen[0].startswith(b"POST http://upstream.invalid/v1/models/a%3Ab/count_tokens?beta=true HTTP/1.1")
        return sent_by

    assert asyncio.run(run()) == ["aiohttp", "sdk", "sdk"]


def test_all_proxy_is_honoured_as_httpx_does(monkeypatch):
    monkeypatch.setenv("ALL_PROXY", "proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost")
    aio.proxy_for.cache_clear()
    try:
        assert aio.proxy_for("https", "api.example.com") == "http://proxy.example:3128"
        assert aio.proxy_for("https", "localhost") is None
    finally:
        aio.proxy_for.cache_clear()


SHIM_HEADERS = [("accept", "application/json"), ("anthropic-version", "2023-06-01"), ("x-stainless-retry-count", "0"),
                ("content-type", "application/json"), ("user-agent", "Anthropic/Python 0.40.0"), ("X-Dup", "1"),
                ("x-dup", "2"), ("x-api-key", "pool")]  # fmt: skip
BUILDS = {  # method, URL, headers, body -> whether Outgoing.build puts it together (else the client builds it)
    "a shim's stream": ("POST", "http://127.0.0.1:8080/v1/messages", SHIM_HEADERS, b'{"stream": true}', True),
    "an empty POST": ("POST", "http://127.0.0.1:8080/v1/messages/count_tokens?beta=true", [], b"", True),
    "the client's own headers replaced": (
        "GET",
        "http://h.example/v1/models?limit=2",
        [("User-Agent", "mine"), ("ACCEPT", "text/plain")],
        b"",
        True,
    ),  # fmt: skip
    "a DELETE": ("DELETE", "https://api.example.com/v1/files/f%3A1", [], b"", True),
    "a PUT": ("PUT", "http://127.0.0.1:8080/v1/x", [], b"", False),
    "a URL the client normalizes": ("POST", "https://API.example.com:443/v1/a b", [], b"{}", False),
    "a Host of its own": ("GET", "http://127.0.0.1:8080/v1/models", [("host", "elsewhere")], b"", False),
}


@pytest.mark.parametrize("case", BUILDS)
@pytest.mark.parametrize("client", ["httpx", "httpx2", "sdk"])
def test_a_request_is_put_together_as_the_sdk_client_builds_it(case, client):
    """Same method, URL, headers (case, order, Host and Content-Length where the client puts them), body,
    timeouts and proxy as the client's `build_request`; a request it would build otherwise is left to it."""
    method, url, headers, body, together = BUILDS[case]
    http = {"httpx": httpx.AsyncClient, "httpx2": HTTP.AsyncClient, "sdk": anthropic.DefaultAsyncHttpxClient}[client]()
    built = aio.Outgoing.build(http, method, url, headers, body)
    assert (built is not None) == together
    if together:
        assert built == aio.Outgoing.of(http.build_request(method, url, headers=headers, content=body))
        assert aio.Outgoing.of(built.rebuilt(http)) == built  # as the client sends it, when aiohttp cannot


def test_a_request_whose_client_holds_a_cookie_or_has_a_header_it_cannot_encode_is_left_to_it():
    http = HTTP.AsyncClient()
    assert aio.Outgoing.build(http, "POST", "http://h.example/v1/messages", [("x-name", "é")], b"{}") is None
    http.cookies.set("session", "1")
    assert aio.Outgoing.build(http, "POST", "http://h.example/v1/messages", [], b"{}") is None


def test_the_pool_adds_its_headers_where_the_caller_set_none_and_its_key_in_place_of_any():
    """Names compare in any case: the caller's header wins over the profile's, the pool's key over both."""
    ((key, pool),) = anthropic.AsyncAnthropic(api_key="pool").auth_headers.items()  # x-api-key or a bearer token
    profile = {"x-caller": "profile", "X-Profile": "p", key.lower(): "stale"}
    sdk = anthropic.AsyncAnthropic(api_key="pool", base_url="http://h.example", default_headers=profile)
    caller = [("X-Caller", "mine"), (key.upper(), "caller's"), ("Accept-Encoding", "br"), ("anthropic-version", "1")]
    assert request_headers(sdk, HttpCall("POST", "/v1/messages", caller)) == [
        ("X-Caller", "mine"), ("anthropic-version", "1"), ("X-Profile", "p"), (key, pool)]  # fmt: skip
    own = HttpCall("POST", "/v1/messages", caller, base_url="http://own.example", api_key="own")
    assert request_headers(sdk, own) == [("X-Caller", "mine"), ("anthropic-version", "1"),
                                         *anthropic.AsyncAnthropic(api_key="own").auth_headers.items()]  # fmt: skip
