"""The HTTP gateway: Anthropic- and OpenAI-compatible endpoints that run through the pool.

Any program that takes a `base_url` gets stall-proof calls by pointing it here:

    anthropic.Anthropic(base_url="http://127.0.0.1:8787")
    openai.OpenAI(base_url="http://127.0.0.1:8787/v1")

Each request is sent on as the caller made it (its credentials dropped: the worker adds
the pool's key), to the profile named by an `x-isopool-profile` header, else to the
default Anthropic profile for `/v1/messages…` and requests carrying `anthropic-version`,
else to the default OpenAI one. Streams are relayed event by event as they arrive.
Bound to loopback it needs no credentials; bound elsewhere it requires its own bearer
token (`gateway_token`), never the provider's key.

It runs as a child of the broker (`python -P -m broker.gateway`), a client of its
frontend, and exits when the broker closes its stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import sys

import msgspec
from aiohttp import web

from .client import AsyncClient
from .config import is_loopback
from .errors import (
    AttemptsExhausted,
    DeadlineExceeded,
    IsopoolError,
    PoolSaturated,
    RateLimited,
    ShuttingDown,
    StreamStalled,
)
from .protocol import LOCAL_HEADERS, HttpCall

log = logging.getLogger(__name__)
PROFILE_HEADER = "x-isopool-profile"
_ENC = msgspec.json.Encoder()


class Gateway:
    def __init__(self, client: AsyncClient, token: str = "", profiles: dict[str, str] | None = None) -> None:
        self.client = client
        self.token = token
        self.defaults = profiles or {"anthropic": "anthropic", "openai": "openai"}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/v1/{tail:.*}", self.handle)
        return app

    def _authorized(self, request: web.Request) -> bool:
        if not self.token:
            return True
        offered = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def route(self, request: web.Request) -> tuple[str, str, str]:
        """(profile, SDK kind, path relative to that SDK's base URL)."""
        path = request.path_qs
        if request.path.startswith("/v1/messages") or "anthropic-version" in request.headers:
            kind, relative = "anthropic", path
        else:
            kind, relative = "openai", path.removeprefix("/v1")
        return request.headers.get(PROFILE_HEADER) or self.defaults[kind], kind, relative

    async def handle(self, request: web.Request) -> web.StreamResponse:
        profile, kind, path = self.route(request)
        if not self._authorized(request):
            return _error(kind, 401, "authentication_error", "this gateway needs its own token (gateway_token)")
        headers = [(str(k), v) for k, v in request.headers.items() if k.lower() not in LOCAL_HEADERS | {PROFILE_HEADER}]
        try:
            call = await self.client.submit_http(profile, HttpCall(request.method, path, headers, await request.read()))
            events = aiter(call)
            first = await anext(events, None)
        except IsopoolError as exc:
            return _pool_error(kind, exc)
        if first is None:
            result = await call.result()
            return web.Response(status=result.status, headers=result.headers, body=result.body)
        head = call.head
        response = web.StreamResponse(status=head.status, headers=head.headers)  # type: ignore[union-attr]
        await response.prepare(request)
        try:
            await response.write(first.sse())
            async for event in events:
                await response.write(event.sse())
        except IsopoolError as exc:  # after output: say it in the stream, as the provider would
            await response.write(_error_event(kind, exc))
        except (ConnectionResetError, asyncio.CancelledError):
            await events.aclose()  # the caller left: the pool cancels the call
            raise
        await response.write_eof()
        return response


def _status(exc: IsopoolError) -> tuple[int, str]:
    if isinstance(exc, StreamStalled | AttemptsExhausted | DeadlineExceeded):
        return 504, "timeout_error"
    if isinstance(exc, RateLimited):
        return 429, "rate_limit_error"
    if isinstance(exc, PoolSaturated | ShuttingDown):
        return 503, "overloaded_error"
    return 502, "api_error"


def _error(kind: str, status: int, kind_name: str, message: str) -> web.Response:
    if kind == "anthropic":
        body = {"type": "error", "error": {"type": kind_name, "message": message}}
    else:
        body = {"error": {"type": kind_name, "message": message, "code": None, "param": None}}
    return web.Response(status=status, body=_ENC.encode(body), content_type="application/json")


def _pool_error(kind: str, exc: IsopoolError) -> web.Response:
    status, name = _status(exc)
    return _error(kind, status, name, f"isopool: {exc}")


def _error_event(kind: str, exc: IsopoolError) -> bytes:
    _, name = _status(exc)
    if kind == "anthropic":
        data = _ENC.encode({"type": "error", "error": {"type": name, "message": f"isopool: {exc}"}})
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + _ENC.encode({"error": {"type": name, "message": f"isopool: {exc}"}}) + b"\n\n"


async def serve(url: str, host: str, port: int, token: str) -> None:
    """Serve until stdin closes (the broker that owns this process stopped or died)."""
    if not is_loopback(host) and not token:
        raise SystemExit(f"refusing to expose the gateway on {host} without a gateway_token")
    async with AsyncClient(url) as client:
        runner = web.AppRunner(Gateway(client, token).app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        print(_ENC.encode({"listening": f"http://{host}:{bound[1]}"}).decode(), flush=True)
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
    host, _, port = args.listen.rpartition(":")
    token = sys.stdin.readline().strip()  # the token comes on stdin, never on the command line
    asyncio.run(serve(args.url, host or "127.0.0.1", int(port), token))


if __name__ == "__main__":
    main()
