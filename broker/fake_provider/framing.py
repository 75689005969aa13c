"""How the fake provider writes a stream's events on the wire: SSE, or Bedrock's event-stream frames.

The faults are the same on both (server.py); only their bytes differ. A stall's keep-alive is
what each wire has that is not an answer event: on SSE an `event: ping` (Anthropic) or a comment,
on an event stream a `ping` chunk or a frame of another event type.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .. import eventstream
from .faults import Fault

_ENC = msgspec.json.Encoder()
# An Anthropic error type -> the exception frame Bedrock ends a stream with for it
_BEDROCK_EXCEPTIONS = {
    "overloaded_error": "serviceUnavailableException",
    "api_error": "internalServerException",
    "rate_limit_error": "throttlingException",
    "invalid_request_error": "validationException",
}


def _data(data: Any) -> bytes:
    return data.encode() if isinstance(data, str) else _ENC.encode(data)


def sse(name: str | None, data: Any) -> bytes:
    if name is None:
        return b"data: " + _data(data) + b"\n\n"
    return b"event: " + name.encode() + b"\ndata: " + _data(data) + b"\n\n"


class Sse:
    """Server-sent events, as the first-party APIs, Vertex and Azure stream them."""

    content_type = "text/event-stream"

    def __init__(self, fmt: Any) -> None:
        self.fmt = fmt

    def event(self, name: str | None, data: Any) -> bytes:
        return sse(name, data)

    def error(self, fault: Fault) -> bytes:
        return sse(*self.fmt.error_event(fault.error, "injected mid-stream error"))

    def keepalive(self, fault: Fault) -> bytes:
        if fault.kind in ("stall-ping", "stall-first"):
            return sse(*self.fmt.ping) if self.fmt.ping is not None else b": ping\n\n"
        return b": keep-alive\n\n" if fault.kind == "stall-comment" else b""


class EventStream:
    """Bedrock's frames: each Anthropic event a `chunk`; a mid-stream error an exception frame."""

    content_type = eventstream.CONTENT_TYPE

    def __init__(self, fmt: Any) -> None:
        self.fmt = fmt

    def event(self, name: str | None, data: Any) -> bytes:
        return eventstream.chunk(_data(data))

    def error(self, fault: Fault) -> bytes:
        kind = _BEDROCK_EXCEPTIONS.get(fault.error, "modelStreamErrorException")
        return eventstream.exception(kind, f"injected mid-stream error ({fault.error})")

    def keepalive(self, fault: Fault) -> bytes:
        if fault.kind in ("stall-ping", "stall-first"):
            return eventstream.chunk(_data(self.fmt.ping[1]))
        return eventstream.event("keepalive", b"{}") if fault.kind == "stall-comment" else b""
