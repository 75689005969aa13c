"""The worker's one aiohttp session, and a relayed request sent on it as the SDK's client would send it.

A relayed request (worker/exchange.py) is built, confined and signed as before: an httpx/httpx2
`Request` from the SDK's own client. Only the send is aiohttp's, because it costs far less: in one
process against the fake provider (`python -m bench.httpclients`), the SDK's async client spends
0.8-1.1 ms of CPU on a tiny request, aiohttp 0.2-0.4 ms. What that client would do is kept: the
request's bytes (method, URL as encoded, headers in their case and order, body), its timeouts
(connect, read), the proxy it reads from the environment, its TLS context and keep-alive expiry,
the body decoded as it decodes it, and its view of the response headers (its own `Headers`: names
lower-cased, a repeated one joined). A request it cannot send so (a SOCKS or HTTPS proxy, an
encoding aiohttp cannot decode) goes by the SDK's client, as before.
"""

from __future__ import annotations

import functools
import ssl
import urllib.request
from typing import Any

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


async def send(session: Session, http: Any, request: Any) -> Any:
    """The open response to `request`, built by the SDK's HTTP client `http`: sent by aiohttp where it
    can send it as `http` would, else by `http`."""
    url = request.url
    proxy = proxy_for(url.scheme, url.host)
    if (proxy and not proxy.startswith("http://")) or not decodable(request.headers.get("accept-encoding", "")):
        return await http.send(request, stream=True)
    limits = request.extensions.get("timeout", {})
    response = await session.get().request(
        request.method,
        yarl.URL(str(url), encoded=True),  # as the SDK's client encoded it (a signature covers it)
        headers=[(name.decode("latin-1"), value.decode()) for name, value in request.headers.raw],
        data=request.content or None,
        proxy=proxy,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=limits.get("connect"), sock_read=limits.get("read")),
        skip_auto_headers=_AUTO_HEADERS,
    )
    return Answer(response, type(request.headers))


class Answer:
    """An aiohttp response read as the relay reads the SDK's client's (worker/calls.py `relay`): its
    status, its headers in the client's own `Headers` class, its body decoded, read whole or as it
    comes. Closing it keeps the connection only if the body was read to its end."""

    __slots__ = ("_response", "headers", "status_code")

    def __init__(self, response: aiohttp.ClientResponse, headers: type) -> None:
        self._response, self.status_code = response, response.status
        self.headers = headers(response.raw_headers)

    async def aread(self) -> bytes:
        return await self._response.read()

    def aiter_bytes(self) -> Any:
        return self._response.content.iter_any()

    async def aclose(self) -> None:
        self._response.release()  # a connection whose body was not read to its end is closed, not pooled
