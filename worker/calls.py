"""Running one SDK call inside a worker and sending what it produces.

A call names a public method path of the SDK client (`messages.create`,
`chat.completions.create`, `beta.messages.count_tokens`, ...). Every step of the path
must be a public SDK resource, so a caller cannot reach private attributes or walk
to arbitrary objects. Streams are read as raw bytes and every real event is sent on
as the provider's own JSON; a non-streaming call of a streamable method is run as a
stream and assembled here, so that its stalls are caught too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import sys
from collections.abc import Iterable
from typing import Any

import msgspec

from broker import eventstream
from broker.protocol import CREDENTIAL_HEADERS, Response, is_framing_header

from .assemble import AnthropicMessage, OpenAIChatCompletion, OpenAIResponse, ProviderStreamError
from .frames import iter_frames
from .hygiene import ANTHROPIC_MESSAGES, StreamCheck, check_for
from .sse import iter_batches

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_NOT_CALLS = {"with_raw_response", "with_streaming_response", "with_options", "copy"}
_REFUSED_KWARGS = {"extra_query"}
# An HTTP field name (RFC 9110 `token`) and what no field value may hold (a tab may): the SDK's client (h11)
# refuses to send any other, and a name carrying `: value` of its own would be a second line upstream.
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

# (SDK kind, method path) -> accumulator of its stream into the non-streaming body
STREAMABLE: dict[tuple[str, str], type] = {
    **{("anthropic", method): AnthropicMessage for method in ANTHROPIC_MESSAGES},
    ("openai", "chat.completions.create"): OpenAIChatCompletion,
    ("openai", "responses.create"): OpenAIResponse,
}

# Response headers that describe bytes as they came off the wire: the relayed body is decoded
# (and possibly assembled), so these would mislead whoever reads it.
RELAYED_BY_US = {"content-length", "content-encoding", "transfer-encoding", "connection"}
DRAIN = 0.1  # seconds a response's rest is read for after its answer was sent (openai's own _DRAIN_TIMEOUT)
_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder()
# A stream's wire format, by its content type -> what reads its events: SSE, or Bedrock's event stream
_STREAM_READERS = (("text/event-stream", iter_batches), (eventstream.CONTENT_TYPE, iter_frames))


def is_error_event(name: str, data: bytes) -> bool:
    """Anthropic and Responses send `event: error`; Chat Completions sends `data: {"error": ...}`."""
    return name == "error" or (not name and data.startswith(b'{"error"'))


class BadCall(ValueError):
    """The call cannot be run as given: unknown method, private path, refused argument."""


def resolve(client: Any, method: str, resource_type: type) -> tuple[Any, str]:
    """(resource, method name) for a public method path, or BadCall."""
    parts = method.split(".")
    if len(parts) < 2 or not all(_NAME.match(p) for p in parts) or parts[-1] in _NOT_CALLS:
        raise BadCall(f"{method!r} is not a public SDK method path like 'messages.create'")
    resource = client
    for depth, part in enumerate(parts[:-1], 1):
        resource = getattr(resource, part, None)
        if resource is None:
            raise _missing(client, method, parts[:depth])
        if not isinstance(resource, resource_type):
            raise BadCall(f"{method!r}: {part!r} is not an SDK resource")
    if not callable(getattr(resource, parts[-1], None)):
        raise _missing(client, method, parts)
    return resource, parts[-1]


def _missing(client: Any, method: str, path: list[str]) -> BadCall:
    """A path the worker's SDK lacks, named with its release: the caller's own SDK may be newer than the
    pool's (openai < 1.66 has no `responses`), and "no such method" alone reads as a typo."""
    sdk = sys.modules[type(client).__module__.partition(".")[0]]
    return BadCall(f"{method!r}: the pool's {sdk.__name__} {sdk.__version__} has no {'.'.join(path)!r} "
                   "(an API of another release, or a misspelt name)")  # fmt: skip


def json_body(body: bytes) -> dict[str, Any]:
    """A relayed request's JSON object body, or BadCall."""
    try:
        args = _DEC.decode(body)
    except msgspec.DecodeError:
        raise BadCall("the request body is not JSON") from None
    if not isinstance(args, dict):
        raise BadCall("the request body is not a JSON object")
    return args


def check_headers(headers: Iterable[tuple[Any, Any]]) -> None:
    """Refuse headers the SDK's client would not send (a name that is not an HTTP token: `Host: elsewhere`
    passed the checks by name and went upstream as a second `Host` line; a value with a control character),
    and those that frame the HTTP request itself: the worker's HTTP client sets them for its own
    connection, and a caller's would point the request, with the pool's key, elsewhere."""
    headers = [(str(name), value) for name, value in headers]
    malformed = sorted({repr(name) for name, value in headers if not _valid_field(name, value)})
    if malformed:
        raise BadCall(f"headers {', '.join(malformed)} are not valid HTTP header fields (a name is a token, a value "
                      "holds no control characters): fix them")  # fmt: skip
    refused = sorted({name for name, _ in headers if is_framing_header(name)})
    if refused:
        raise BadCall(f"headers {', '.join(refused)} frame the HTTP request and are set by the pool's HTTP client: "
                      "drop them")  # fmt: skip


def _valid_field(name: str, value: Any) -> bool:
    """A name the SDK's client sends, with a value it sends (one it drops, such as `Omit`, is no text)."""
    return _FIELD_NAME.fullmatch(name) is not None and not (isinstance(value, str) and _CONTROL.search(value))


def check_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse per-request credentials, framing headers and query overrides: the worker's key must go
    only to its provider."""
    headers = kwargs.get("extra_headers") or {}
    if not isinstance(headers, dict):
        raise BadCall("extra_headers must be a mapping")
    refused = sorted(h for h in headers if str(h).lower() in CREDENTIAL_HEADERS)
    refused += sorted(_REFUSED_KWARGS & kwargs.keys())
    if refused:
        raise BadCall(f"per-request {', '.join(refused)} overrides are not allowed by this pool")
    check_headers(headers.items())
    timeout = kwargs.get("timeout")
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and not 0 < timeout < math.inf:
        # nan reached the SDK's HTTP client, which failed the call as a connection error, retried as one
        raise BadCall(f"timeout must be a positive, finite number of seconds (or None), got {timeout!r}")


async def run_call(client: Any, kind: str, resource_type: type, method: str, kwargs: dict[str, Any], emit: Any) -> None:
    """Run an SDK method call, reporting through `emit` (head, event, progress, result)."""
    check_kwargs(kwargs)
    resource, name = resolve(client, method, resource_type)
    raw = getattr(resource.with_streaming_response, name)
    streaming = bool(kwargs.get("stream"))
    accumulator = STREAMABLE.get((kind, method))
    if not streaming and accumulator is not None:
        kwargs = as_stream(kind, method, kwargs)
    async with raw(**kwargs) as resp:
        await relay(resp.http_response, emit, streaming, accumulator, check_for(kind, method, kwargs))
        await drain(resp.http_response)


async def drain(http: Any) -> None:
    """Read the rest of a response whose stream ended at its `[DONE]` (the chunked body's end follows it),
    DRAIN at most, as the SDK does: HTTP/1.1 keeps a connection only for a body read to its end, and without
    this every call paid a new connection (the worker's connect, the provider's accept). Its answer already
    went out: the caller waits for none of this."""
    if http.is_closed:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DRAIN):
            async for _ in http.stream:  # the transport's bytes: the decoding reader stopped at `[DONE]`
                pass


def as_stream(kind: str, method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The streaming form of a non-streaming call, whose events are assembled into its body."""
    args = {**kwargs, "stream": True}
    if kind == "openai" and method == "chat.completions.create":
        args["stream_options"] = {**(kwargs.get("stream_options") or {}), "include_usage": True}
    return args


async def relay(
    http: Any, emit: Any, streaming: bool, accumulator: type | None, check: StreamCheck, raise_on_error: bool = True
) -> None:
    """Send what the provider answered: a plain body; each real event of a stream as it arrives
    (pings, comments and, by `check`, malformed events dropped; a stream cut short raises
    StreamIncomplete); or a stream the worker opened for a non-streaming call, assembled into that
    call's body. A mid-stream error event ends the stream: it is sent as one (which the broker holds
    while it decides whether the call is retried or continued), then, with `raise_on_error`, a
    ProviderStreamError (else the stream's end, as for any stream: the caller's SDK reads the event)."""
    headers = [(k, v) for k, v in http.headers.items() if k.lower() not in RELAYED_BY_US]
    if http.status_code >= 400:  # an error answer owes no terminal event: relayed as it came
        check = StreamCheck()
    await emit.head(Response(http.status_code, headers))  # the headers came: first_event_timeout from now on
    content_type = http.headers.get("content-type", "")
    reader = next((r for prefix, r in _STREAM_READERS if content_type.startswith(prefix)), None)
    if reader is None:
        body = await http.aread()
        if http.status_code < 400:
            check.facts.body(body)
            await _tell(check, emit)
        await emit.result(Response(http.status_code, headers, body))
    elif streaming or accumulator is None:
        async with contextlib.aclosing(reader(http.aiter_bytes(), check)) as batches:
            async for batch in batches:
                at = next((i for i, (name, data) in enumerate(batch) if is_error_event(name, data)), None)
                if at is None:
                    await emit.events(batch)
                    if check.facts.changed or check.ended:  # most events say nothing of the answer
                        await _tell(check, emit)
                    continue
                if at:
                    await emit.events(batch[:at])
                await emit.error_event(batch[at])
                await _tell(check, emit, ending=False)  # an error event is no answer's end: the broker decides
                if raise_on_error:
                    raise ProviderStreamError(_DEC.decode(batch[at][1]))
                break
        end = Response(http.status_code, headers, malformed_events=check.malformed) if check.malformed else None
        await emit.result(end)  # an end that says no more than the head did is left empty
    else:
        acc = accumulator()
        async for batch in reader(http.aiter_bytes(), check):
            for event_name, data in batch:
                acc.feed(event_name, data)
            await emit.progress()
            await _tell(check, emit)
        body = _ENC.encode(acc.result())
        headers = [*(h for h in headers if h[0].lower() != "content-type"), ("content-type", "application/json")]
        await emit.result(Response(http.status_code, headers, body, check.malformed))


async def _tell(check: StreamCheck, emit: Any, ending: bool = True) -> None:
    """Tell the broker what the answer newly said of itself (usage, id, model: Kind.USAGE), and once
    that the stream said it finished (its watchdog then waits for the end)."""
    if check.facts.changed:
        await emit.usage(check.facts)
    if ending and check.ended and not check.told:
        check.told = True
        await emit.ending()
