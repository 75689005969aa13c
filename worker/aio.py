"""The worker's one aiohttp session, and a relayed request sent on it as the SDK's client would send it.

A relayed request (worker/exchange.py) is the one the SDK's own HTTP client would build, confined
and signed as before. A first-party one is put together here (`Outgoing.build`: the client's own
headers and timeouts read once, the request's merged as that client merges them), because building
an httpx/httpx2 `Request` cost ~0.1 ms of the worker's CPU per call; a cloud's (signed), or one the
client would build otherwise (a URL it normalizes, a cookie it holds, ...), is built by the client.
Only the send is aiohttp's, because it costs far less: in one process against the fake provider
(`python -m bench.httpclients`), the SDK's async client spends 0.8-1.1 ms of CPU on a tiny request,
aiohttp 0.2-0.4 ms. What that client would do is kept: the request's bytes (method, URL as encoded,
headers in their case and order, body), its timeouts (connect, read), the proxy it reads from the
environment, its TLS context and keep-alive expiry, the body decoded as it decodes it, and its view
of the response headers (names lower-cased, a repeated one joined). A request it cannot send so (a
SOCKS or HTTPS proxy, an encoding aiohttp cannot decode) goes by the SDK's client, as before.
"""

from __future__ import annotations

import functools
import ssl
import urllib.request
from typing import Any, NamedTuple

import aiohttp
import yarl
from aiohttp import compression_utils

from broker.sdklib import library

# The SDKs' DEFAULT_CONNECTION_LIMITS: an idle connection is not reused after this, so a server that
# closes idle ones a little later (5-10 s is common) never resets a request sent on one.
KEEPALIVE_EXPIRY = 5.0
# h11's bound on a response's header block (httpx's parser): aiohttp's default (8190 per line) is stricter.
_MAX_HEADER = 16 * 1024
# What aiohttp adds to a request that lacks it: the SDK's client sends these as it set them, or not at all.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_OPTIONAL = (("br", compression_utils.HAS_BROTLI), ("zstd", getattr(compression_utils, "HAS_ZSTD", False)))
_DECODED = {"identity", "gzip", "deflate"} | {coding for coding, installed in _OPTIONAL if installed}


class Session:
    """The worker's one aiohttp session: a keep-alive pool for relayed and timed calls, opened on the
    first one with the TLS context of the SDK `family`'s client (the zygote's, else one its HTTP library
    makes as for `verify=True`), closed when the worker's loop ends."""

    def __init__(self, tls: ssl.SSLContext | None, family: str) -> None:
        self._tls, self._family, self._session = tls, family, None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None:
            tls = self._tls or library(self._family).create_ssl_context()
            connector = aiohttp.TCPConnector(limit=0, ssl=tls, keepalive_timeout=KEEPALIVE_EXPIRY)
            # trust_env would look up ~/.netrc in a thread at every request; proxies are found by proxy_for
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                                  max_line_size=_MAX_HEADER, max_field_size=_MAX_HEADER)  # fmt: skip
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@functools.lru_cache(maxsize=64)
def proxy_for(scheme: str, host: str) -> str | None:
    """The proxy the SDKs' clients use for `scheme://host`, as httpx reads it: HTTP(S)_PROXY, else
    ALL_PROXY (a bare host:port meaning http://), unless NO_PROXY names the host."""
    proxies = urllib.request.getproxies_environment()
    if not proxies or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    proxy = proxies.get(scheme) or proxies.get("all")
    return proxy if proxy is None or "://" in proxy else f"http://{proxy}"


@functools.lru_cache(maxsize=16)
def decodable(accept_encoding: str) -> bool:
    """Whether aiohttp decodes every encoding the request asks for, as the SDK's client would."""
    codings = {part.split(";", 1)[0].strip().lower() for part in accept_encoding.split(",")}
    return codings - {""} <= _DECODED


class Outgoing(NamedTuple):
    """A request as it goes on the wire: method, URL (as encoded), headers in their case and order, body;
    the timeouts of the SDK's client (its `Timeout` as a dict) and the proxy it would use."""

    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    limits: dict[str, float | None]
    proxy: str | None

    @classmethod
    def of(cls, request: Any) -> Outgoing:
        """An httpx/httpx2 `Request` (one a cloud signed, or one built as `build` would not)."""
        url = request.url
        headers = [(name.decode("latin-1"), value.decode()) for name, value in request.headers.raw]
        return cls(request.method, str(url), headers, request.content, request.extensions.get("timeout", {}),
                   proxy_for(url.scheme, url.host))  # fmt: skip

    @classmethod
    def build(cls, http: Any, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> Outgoing | None:
        """The request the SDK's HTTP client `http` builds for these (`build_request(method, url,
        headers=headers, content=body)`), put together without it: its own headers, except those the
        request sets, then the request's, behind a `Host` and ahead of a `Content-Length` as it adds them.
        None where that client would build it otherwise than this says (a URL it would normalize, a
        header it would derive from another or encode otherwise, a cookie it holds, another method): build
        it so (`built`)."""
        own = _own(http)
        target = _target(type(http.base_url), url)
        names = {name.lower() for name, _ in headers}
        if (own is None or target is None or method not in _PLAIN_METHODS or not names.isdisjoint(_DERIVED)
                or http.cookies or not all(k.isascii() and v.isascii() for k, v in headers)):  # fmt: skip
            return None
        netloc, scheme, host = target
        auto = [("Host", netloc), ("Content-Length", "0")] if not body and method == "POST" else [("Host", netloc)]
        kept = [(name, value) for name, lower, value in own.headers if lower not in names]
        length = [("Content-Length", str(len(body)))] if body else []
        return cls(method, url, [*auto, *kept, *headers, *length], body, own.limits, proxy_for(scheme, host))

    def rebuilt(self, http: Any) -> Any:
        """The same request as the SDK's client `http` builds it, to send by that client."""
        return built(http, self.method, self.url, self.headers, self.body, extensions={"timeout": self.limits})


def built(http: Any, method: str, url: str, headers: list[tuple[str, str]], body: bytes, **extra: Any) -> Any:
    """The request the SDK's HTTP client `http` builds, its header values encoded as UTF-8: the caller's SDK
    (Anthropic's) sent them so, and the client's own encoding (ASCII) would refuse any other value."""
    encoded = [(name, value.encode()) for name, value in headers]
    return http.build_request(method, url, headers=encoded, content=body, **extra)


# Methods whose requests the SDKs' clients build alike (a body or none): for others (PUT, PATCH, QUERY, ...)
# httpx and httpx2 differ on an empty body's Content-Length, and such a request is built by the client.
_PLAIN_METHODS = frozenset({"GET", "POST", "DELETE"})
# Headers a client derives from the URL and the body unless the request sets them.
_DERIVED = frozenset({"host", "content-length", "transfer-encoding"})


class _Own(NamedTuple):
    headers: list[tuple[str, str, str]]  # name, its lower case, value
    limits: dict[str, float | None]


@functools.lru_cache(maxsize=16)
def _own(http: Any) -> _Own | None:
    """What the SDK's HTTP client puts on every request it builds (its own headers and timeouts, fixed
    when it is made); None for a client with a base URL or query parameters of its own."""
    if str(http.base_url) or http.params:
        return None
    headers = [(k.decode("latin-1"), k.decode("latin-1").lower(), v.decode()) for k, v in http.headers.raw]
    return _Own(headers, http.timeout.as_dict())


@functools.lru_cache(maxsize=256)
def _target(url_type: type, url: str) -> tuple[str, str, str] | None:
    """A URL's `Host` value, scheme and host, as the SDK's client reads it; None where it would send
    another URL than this one (it normalizes it: case, default port, a character it quotes)."""
    parsed = url_type(url)
    return (parsed.netloc.decode("ascii"), parsed.scheme, parsed.host) if str(parsed) == url else None


@functools.lru_cache(maxsize=256)
def _yarl(url: str) -> yarl.URL:
    return yarl.URL(url, encoded=True)  # as the SDK's client encoded it (a signature covers it)


@functools.lru_cache(maxsize=16)
def _timeout(connect: float | None, read: float | None) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)


async def send(session: Session, http: Any, request: Outgoing) -> Any:
    """The open response to `request`, for the SDK's HTTP client `http`: sent by aiohttp where it can
    send it as `http` would, else by `http`."""
    accepted = ", ".join(value for name, value in request.headers if name.lower() == "accept-encoding")
    if (request.proxy and not request.proxy.startswith("http://")) or not decodable(accepted):
        return await http.send(request.rebuilt(http), stream=True)
    limits = request.limits
    response = await session.get().request(
        request.method,
        _yarl(request.url),
        headers=request.headers,
        data=request.body or None,
        proxy=request.proxy,
        timeout=_timeout(limits.get("connect"), limits.get("read")),
        skip_auto_headers=_AUTO_HEADERS,
    )
    return Answer(response)


def response_headers(raw: Any) -> dict[str, str]:
    """Response headers as the SDKs' clients give them (their `Headers.items()`): names lower-cased, a
    repeated one's values joined in order, all read as ASCII, else UTF-8, else Latin-1."""
    for encoding in ("ascii", "utf-8", "iso-8859-1"):
        try:
            pairs = [(name.lower().decode(encoding), value.decode(encoding)) for name, value in raw]
        except UnicodeDecodeError:
            continue
        headers: dict[str, str] = {}
        for name, value in pairs:
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return headers
    raise AssertionError("Latin-1 decodes any bytes")


class Answer:
    """An aiohttp response read as the relay reads the SDK's client's (worker/calls.py `relay`): its
    status, its headers as that client gives them (`response_headers`), its body decoded, read whole or
    as it comes. Closing it keeps the connection only if the body was read to its end."""

    __slots__ = ("_response", "headers", "status_code")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response, self.status_code = response, response.status
        self.headers = response_headers(response.raw_headers)

    async def aread(self) -> bytes:
        return await self._response.read()

    def aiter_bytes(self) -> Any:
        return self._response.content.iter_any()

    async def aclose(self) -> None:
        self._response.release()  # a connection whose body was not read to its end is closed, not pooled
