"""Sending an HTTP request that the caller's own SDK built, with the worker's own client.

This is how the drop-in shim works: the caller's SDK builds the request (any method,
helper or future endpoint) and parses the answer; only its transport is replaced, and
the worker performs the request against its profile's base URL with its own key.
The path must stay under that base URL, the caller's credentials are dropped and headers
that frame the request are refused, so a caller can never send the worker's key elsewhere.
Where the pool allows it, a call brings its own key (and may then name its own base URL),
and nothing of the pool's goes with it but the profile's headers to the profile's upstream.
A non-streaming call to an endpoint that can stream is sent as a stream and assembled
here, so its stalls are caught too. A provider's HTTP error answer is read whole and raised as
a `ProviderHttpError`, so that the broker can retry it within the call's one budget; the one it
does not retry reaches the caller as it came (status, headers, body), and the caller's SDK raises
its own exception class. A mid-stream `error` event reaches the caller as it came, unless the broker
retries or continues the call.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from broker.config import Profile
from broker.protocol import CREDENTIAL_HEADERS, HttpCall, path_problem

from . import aio, clouds
from .calls import RELAYED_BY_US, STREAMABLE, BadCall, as_stream, check_headers, json_body, relay
from .hygiene import check_for

# The caller's request headers that never go upstream: its credentials (the worker adds the
# pool's, or the call's own `api_key`) and the encodings it accepts (the worker's client decodes).
_DROPPED = CREDENTIAL_HEADERS | {"accept-encoding"}
# Who pays for a call made with the pool's key: what an OpenAI client read from OPENAI_ORG_ID and
# OPENAI_PROJECT_ID. They go with that key only, and give way to the caller's own.
_BILLING = ("OpenAI-Organization", "OpenAI-Project")
# Streamable endpoints, by path relative to each SDK's default base URL.
_ENDPOINTS = {
    ("anthropic", "/v1/messages"): "messages.create",
    ("openai", "/chat/completions"): "chat.completions.create",
    ("openai", "/responses"): "responses.create",
}
_ENC = msgspec.json.Encoder()


class ProviderHttpError(Exception):
    """The provider's HTTP error answer to a relayed request: its status, headers and body, for the
    broker to retry or to hand back as it came."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        super().__init__(f"Error code: {status} - {body[:500].decode(errors='replace')}")
        self.status = status
        self.headers = [(k, v) for k, v in headers if k.lower() not in RELAYED_BY_US]
        self.body = body


def check_path(path: str) -> None:
    if problem := path_problem(path):
        raise BadCall(problem)


async def run_http(sdk: Any, http: Any, session: aio.Session, profile: Profile, call: HttpCall, emit: Any,
                   allow_overrides: bool = False) -> None:  # fmt: skip
    """Send `call` as the worker's HTTP client `http` would (by the worker's aiohttp `session`), with the
    base URL and key of `sdk` (or the request's own, where the pool allows overrides), and relay the
    answer. On a cloud profile, a first-party request is put in the cloud's form, and each attempt is
    authorized (signed) afresh."""
    kind, family, cloud = profile.kind, profile.family, clouds.relay(profile.kind)
    if cloud is not None:
        call = await cloud.from_first_party(sdk, call, profile)
    route = call.path.split("?", 1)[0]
    body = call.body
    method = None if call.method != "POST" else cloud.method_of(route) if cloud else _ENDPOINTS.get((kind, route))
    streaming, accumulator, args = True, None, {}
    if method is not None and body:
        args = json_body(body)
        streaming = cloud.streams(route, args) if cloud else bool(args.get("stream"))
        if not streaming:
            accumulator = STREAMABLE[(family, method)]
            path, args = cloud.stream_form(call.path, args) if cloud else (call.path, as_stream(kind, method, args))
            call, body = msgspec.structs.replace(call, path=path), _ENC.encode(args)
    response = await aio.send(session, http, await prepare(sdk, http, call, body, allow_overrides, cloud))
    try:
        if response.status_code >= 400:
            raise ProviderHttpError(response.status_code, response.headers.items(), await response.aread())
        await relay(response, emit, streaming, accumulator, check_for(family, method, args), raise_on_error=False)
    finally:
        await response.aclose()


async def prepare(sdk: Any, http: Any, call: HttpCall, body: bytes, allow_overrides: bool,
                  cloud: Any = None) -> aio.Outgoing:  # fmt: skip
    """The request for `call` (with `body`) as the SDK's HTTP client `http` builds it, confined to the
    profile's base URL and sent with the worker's own credentials unless the pool allows the request's
    own; a cloud's signed or authorized over this attempt's final request."""
    if cloud is not None and (call.api_key or call.base_url):
        raise BadCall("a call to a cloud profile cannot bring its own key or base_url: the workers sign")
    url, headers = destination(sdk, call, allow_overrides)
    if cloud is None and (request := aio.Outgoing.build(http, call.method, url, headers, body)) is not None:
        return request
    made = aio.built(http, call.method, url, headers, body)
    if cloud is not None:
        await cloud.authorize(sdk, made)
    return aio.Outgoing.of(made)


async def signed(sdk: Any, http: Any, profile: Profile, call: HttpCall) -> tuple[str, list[tuple[str, str]], bytes]:
    """A load test's call to a cloud profile (worker/timing.py) as run_http would send it: in the cloud's
    form and signed for this attempt, as its URL, headers and body."""
    cloud = clouds.relay(profile.kind)
    call = await cloud.from_first_party(sdk, call, profile)  # type: ignore[union-attr]
    request = await prepare(sdk, http, call, call.body, False, cloud)
    return request.url, request.headers, call.body


def destination(sdk: Any, call: HttpCall, allow_overrides: bool) -> tuple[str, list[tuple[str, str]]]:
    """Where `call` goes and with which headers: confined to the profile's base URL, with the
    worker's own credentials unless the pool allows the request's own."""
    check_path(call.path)
    check_overrides(call, allow_overrides)
    url = (call.base_url or str(sdk.base_url)).rstrip("/") + call.path
    return url, request_headers(sdk, call)


def check_overrides(call: HttpCall, allow_overrides: bool) -> None:
    if (call.base_url or call.api_key) and not allow_overrides:
        raise BadCall("this pool does not allow per-request base_url or api_key (setting allow_overrides)")
    if call.base_url and not call.api_key:
        raise BadCall("a per-request base_url needs the caller's own api_key with it: the pool's key goes only "
                      "to the pool's own provider")  # fmt: skip


def request_headers(sdk: Any, call: HttpCall) -> list[tuple[str, str]]:
    """The caller's headers, then what the pool adds where the caller set none: to the profile's own
    upstream, the profile's default headers; with the pool's key, the organization and project its
    SDK client read. Last the credentials, the call's own key (sent as the worker's SDK sends a key)
    or the pool's, in place of any header of their names. (Names compare in any case, as HTTP's do.)"""
    check_headers(call.headers)
    headers = [(k, v) for k, v in call.headers if k.lower() not in _DROPPED]
    defaults = {} if call.base_url else profile_headers(sdk)
    if call.api_key:
        credentials = sdk.copy(api_key=call.api_key).auth_headers
    else:
        credentials = sdk.auth_headers
        defaults |= billing(sdk)
    names = {name.lower() for name, _ in headers}
    for name, value in defaults.items():
        if (lower := name.lower()) not in names:
            names.add(lower)
            headers.append((name, value))
    replaced = {name.lower() for name in credentials}
    return [*(h for h in headers if h[0].lower() not in replaced), *credentials.items()]


@functools.lru_cache(maxsize=16)
def billing(sdk: Any) -> dict[str, str]:
    """Who pays for a call with the pool's key, as the worker's SDK client read it when it was made
    (its `default_headers` are put together afresh at every read)."""
    return {k: v for k in _BILLING if isinstance(v := sdk.default_headers.get(k), str)}


def profile_headers(sdk: Any) -> dict[str, str]:
    """The headers the operator set for the profile's upstream: its `default_headers` (and the SDK's
    own *_CUSTOM_HEADERS variable), which the SDK client keeps as its custom headers."""
    return {k: v for k, v in sdk._custom_headers.items() if isinstance(v, str)}
