"""Sending an HTTP request that the caller's own SDK built, with the worker's own client.

This is how the drop-in shim works: the caller's SDK builds the request (any method,
helper or future endpoint) and parses the answer; only its transport is replaced, and
the worker performs the request against its profile's base URL with its own key.
The path must stay under that base URL and the caller's credentials are dropped, so a
caller can never send the worker's key elsewhere. A non-streaming call to an endpoint
that can stream is sent as a stream and assembled here, so its stalls are caught too.
Provider errors and mid-stream `error` events are relayed as they are: the caller's
SDK raises its own exception classes and applies its own retry settings.
"""

from __future__ import annotations

from typing import Any

import msgspec

from broker.protocol import LOCAL_HEADERS, HttpCall

from .calls import STREAMABLE, BadCall, as_stream, relay

# The caller's request headers that never go upstream: its local ones (credentials: the
# worker adds its own) and the transfer details the worker's HTTP client sets itself.
_DROPPED = LOCAL_HEADERS | {"transfer-encoding", "accept-encoding"}
# Streamable endpoints, by path relative to each SDK's default base URL.
_ENDPOINTS = {
    ("anthropic", "/v1/messages"): "messages.create",
    ("openai", "/chat/completions"): "chat.completions.create",
    ("openai", "/responses"): "responses.create",
}
_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder()


def _auth(kind: str, key: str) -> list[tuple[str, str]]:
    return [("x-api-key", key)] if kind == "anthropic" else [("authorization", f"Bearer {key}")]


def check_path(path: str) -> None:
    route = path.split("?", 1)[0]
    if not route.startswith("/") or route.startswith("//") or ".." in route.split("/") or "#" in path:
        raise BadCall(f"path {path!r} must be a plain absolute path under the profile's base URL")


async def run_http(sdk: Any, http: Any, kind: str, call: HttpCall, emit: Any, allow_overrides: bool = False) -> None:
    """Send `call` with the worker's HTTP client `http`, the base URL and key of `sdk` (or the
    request's own, where the pool allows overrides), and relay the answer."""
    route = call.path.split("?", 1)[0]
    body = call.body
    method = _ENDPOINTS.get((kind, route)) if call.method == "POST" else None
    streaming, accumulator = True, None
    if method is not None and body:
        try:
            args = _DEC.decode(body)
        except msgspec.DecodeError:
            raise BadCall("the request body is not JSON") from None
        streaming = bool(args.get("stream"))
        if not streaming:
            accumulator = STREAMABLE[(kind, method)]
            body = _ENC.encode(as_stream(kind, method, args))
    response = await send(sdk, http, kind, call, body, allow_overrides)
    try:
        await relay(response, emit, streaming, accumulator, raise_on_error=False)
    finally:
        await response.aclose()


async def send(sdk: Any, http: Any, kind: str, call: HttpCall, body: bytes, allow_overrides: bool) -> Any:
    """Open the response to `call` (with `body`), confined to the profile's base URL and sent with
    the worker's own credentials unless the pool allows the request's own."""
    check_path(call.path)
    if (call.base_url or call.api_key) and not allow_overrides:
        raise BadCall("this pool does not allow per-request base_url or api_key (setting allow_overrides)")
    headers = [(k, v) for k, v in call.headers if k.lower() not in _DROPPED]
    headers += _auth(kind, call.api_key) if call.api_key else list(sdk.auth_headers.items())
    url = (call.base_url or str(sdk.base_url)).rstrip("/") + call.path
    return await http.send(http.build_request(call.method, url, headers=headers, content=body), stream=True)
