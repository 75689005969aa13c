"""The shim's HTTP transports: each request the caller's SDK builds goes through the pool.

The SDK keeps building requests and parsing answers in the caller's process; only the
bytes travel. A stream comes back event by event as real SSE (pings and keep-alives
were dropped by the worker); a stall before any output was retried by the pool and
never shows; a failure after output raises the SDK's own timeout or connection error.
The pool does the retrying: the shim's SDK client is built with max_retries=0, and the caller's
`max_retries` (the SDK's default 2: three attempts) is each call's attempt budget in the pool.
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from types import ModuleType
from typing import Any

from ..client.client import AsyncCall, AsyncClient, CallLimits, Client, StreamEvent, SyncCall, sse
from ..client.fallbacks import HEADER as FALLBACKS
from ..client.fallbacks import take_fallbacks
from ..errors import IsopoolError
from ..protocol import HttpCall, is_local_header, without_bearer
from .errors import SdkErrors

# The key a shim client is built with when it has none of its own (its SDK wants one to build
# requests): a request that carries it is sent with the pool's key.
STAND_IN_KEY = "isopool"


def limits_of(request: Any, attempts: int | None, fallbacks: list[tuple[str, str]] | None) -> CallLimits:
    """The SDK's read timeout for this call (its default or a per-call `timeout=`) as a cap on
    the pool's stall limits (the pool never waits longer than the SDK itself would have), the
    call's attempts: what the caller's SDK would have made (its max_retries + 1), and the
    fallbacks it named itself (`extra_body={"fallbacks": [...]}` or an `x-isopool-fallbacks` header)."""
    read = (request.extensions.get("timeout") or {}).get("read")
    return CallLimits(read_timeout=read or None, max_attempts=attempts, fallbacks=fallbacks)


def to_http_call(
    request: Any, base_path: str, base_url: str, placement: dict[str, str] | None = None
) -> tuple[HttpCall, list[tuple[str, str]] | None, dict[str, Any]]:
    """The request as the worker should send it: path relative to the shim's base URL; the
    client's own key, if its SDK put one on the request, apart; none of the headers that frame
    the request (the worker's HTTP client sets its own, whatever the caller added); where a cloud
    client named it, its placement; and apart, the fallbacks it names (client/fallbacks.py), which are
    the pool's, not the provider's, and the body's `model` and `stream`, which the broker reads.
    The headers are read in one pass (httpx's lookups decode every header each time)."""
    path = request.url.raw_path.decode("ascii")
    if base_path and path.startswith(base_path):
        path = path[len(base_path) :] or "/"
    named: dict[str, str] = {}  # each header by its lower-case name, repeated ones joined (as httpx's `get`)
    headers = []
    for name, value in request.headers.multi_items():
        named[name] = f"{named[name]}, {value}" if name in named else value
        if not is_local_header(name) and name != FALLBACKS:
            headers.append((name, value))
    body, fallbacks, fields = take_fallbacks(named, request.read())
    call = HttpCall(request.method, path, headers, body, base_url, own_key(named), placement or {})
    return call, fallbacks, fields


def own_key(headers: dict[str, str]) -> str:
    """The credential the caller's SDK put on the request (an api_key, a bearer token, one its
    credentials provider made), or "" for the stand-in: the pool's key then."""
    for key in (without_bearer(headers.get("authorization", "")), headers.get("x-api-key"), headers.get("api-key")):
        if key and key != STAND_IN_KEY:
            return key
    return ""


def served(headers: list[tuple[str, str]], call: Any) -> list[tuple[str, str]]:
    """The answer's headers and who answered it (`x-isopool-*`, visible through `with_raw_response`)."""
    return [*headers, *(call.served.headers() if call.served is not None else [])]


@functools.cache
def transports(lib: ModuleType) -> tuple[type, type]:
    """(PoolTransport, AsyncPoolTransport) on `lib` (httpx or httpx2): an SDK accepts only its own
    library's client, and a client only its own library's transport and byte streams."""

    class _Events(lib.SyncByteStream):
        """A stream's events as the SDK reads them: those that arrived together, in one chunk."""

        def __init__(self, first: list[StreamEvent], call: SyncCall, errors: SdkErrors, request: Any) -> None:
            self._first, self._call, self._errors, self._request = first, call, errors, request

        def __iter__(self) -> Iterator[bytes]:
            events, call = self._first, self._call
            try:
                while events:
                    yield sse(events)
                    events = call.batch()
                call.result()
            except IsopoolError as exc:
                raise self._errors.after_output(exc, self._request) from exc
            finally:
                call.cancel()  # if it had not ended: the SDK stopped reading, or Ctrl-C

        def close(self) -> None:
            self._call.cancel()  # if it had not ended

    class _AsyncEvents(lib.AsyncByteStream):
        def __init__(self, first: list[StreamEvent], call: AsyncCall, errors: SdkErrors, request: Any) -> None:
            self._first, self._call, self._errors, self._request = first, call, errors, request

        async def __aiter__(self) -> AsyncIterator[bytes]:
            events, call = self._first, self._call
            try:
                while events:
                    yield sse(events)
                    events = await call.batch()
                await call.result()
            except IsopoolError as exc:
                raise self._errors.after_output(exc, self._request) from exc
            finally:
                await call.cancel()  # if it had not ended: the SDK stopped reading, or the task was cancelled

        async def aclose(self) -> None:
            await self._call.cancel()  # if it had not ended

    class PoolTransport(lib.BaseTransport):
        """Sends each request of a synchronous SDK client through a pool `Client`: this process's
        (`connection()`), so that a forked child's calls go through its own."""

        def __init__(
            self, connection: Callable[[], Client], profile: str, base_path: str, errors: SdkErrors,
            base_url: str = "", attempts: int | None = None, placement: dict[str, str] | None = None,
        ) -> None:  # fmt: skip
            self._connection, self._profile, self._base_path, self._errors = connection, profile, base_path, errors
            self._base_url = base_url  # the client's own upstream, for pools that allow one (embedded pools do)
            self.attempts = attempts  # each call's attempt budget in the pool (None: the pool's max_attempts)
            self.placement = placement or {}  # a cloud client's region, project or endpoint (shim/clouds.py)

        def changed(self, **fields: Any) -> PoolTransport:
            """The same transport with another `attempts` budget or `placement` (an SDK client's
            `with_options(max_retries=…)`, `with_options(aws_region=…)`)."""
            twin = copy.copy(self)
            vars(twin).update(fields)
            return twin

        def handle_request(self, request: Any) -> Any:
            http_call, fallbacks, fields = to_http_call(request, self._base_path, self._base_url, self.placement)
            limits = limits_of(request, self.attempts, fallbacks)
            try:
                call = self._connection().submit_http(self._profile, http_call, limits, fields)
                try:
                    first = call.batch()
                    result = None if first else call.result()
                except BaseException:  # Ctrl-C while waiting: the call goes too
                    call.cancel()
                    raise
            except IsopoolError as exc:
                raise self._errors.before_output(exc, request) from exc
            if result is not None:
                return lib.Response(result.status, headers=served(result.headers, call), content=result.body)
            stream = _Events(first, call, self._errors, request)
            return lib.Response(call.head.status, headers=served(call.head.headers, call), stream=stream)  # type: ignore[union-attr]

    class AsyncPoolTransport(lib.AsyncBaseTransport):
        """Sends each request of an asyncio SDK client through a pool `AsyncClient`, made on first
        use in the running event loop."""

        def __init__(
            self, url: str, profile: str, base_path: str, errors: SdkErrors, broker_timeout: float, base_url: str = "",
            attempts: int | None = None, placement: dict[str, str] | None = None,
        ) -> None:  # fmt: skip
            self._url, self._profile, self._base_path, self._errors = url, profile, base_path, errors
            self._broker_timeout, self._base_url = broker_timeout, base_url
            self.attempts, self.placement = attempts, placement or {}
            self._client: AsyncClient | None = None
            self._loop: asyncio.AbstractEventLoop | None = None

        def changed(self, **fields: Any) -> AsyncPoolTransport:
            """The same transport with another `attempts` or `placement`, and a pool connection of its own
            (closing one SDK client then leaves the other's)."""
            twin = copy.copy(self)
            vars(twin).update(fields, _client=None, _loop=None)
            return twin

        async def handle_async_request(self, request: Any) -> Any:
            loop = asyncio.get_running_loop()
            if self._client is None or self._loop is not loop:  # a client serves one event loop
                self._client, self._loop = AsyncClient(self._url, self._broker_timeout), loop
            http_call, fallbacks, fields = to_http_call(request, self._base_path, self._base_url, self.placement)
            limits = limits_of(request, self.attempts, fallbacks)
            try:
                call = await self._client.submit_http(self._profile, http_call, limits, fields)
                try:
                    first = await call.batch()
                    result = None if first else await call.result()
                except BaseException:  # the task cancelled while waiting: so is the call
                    await call.cancel()
                    raise
            except IsopoolError as exc:
                raise self._errors.before_output(exc, request) from exc
            if result is not None:
                return lib.Response(result.status, headers=served(result.headers, call), content=result.body)
            stream = _AsyncEvents(first, call, self._errors, request)
            return lib.Response(call.head.status, headers=served(call.head.headers, call), stream=stream)  # type: ignore[union-attr]

        async def aclose(self) -> None:
            if self._client is not None:
                await self._client.close()

    return PoolTransport, AsyncPoolTransport
