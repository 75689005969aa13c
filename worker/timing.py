"""Timing a load test's stream where its bytes arrive, instead of relaying its events.

A timed call (`HttpCall.timed`) is sent like any other, but what goes back to the caller
is one `Tick` per read of the stream: the arrival time taken here, before anything is
parsed or relayed, the number of output deltas in that read, and the usage and errors
once the provider reports them. The broker still sees one EVENT per read, so its watchdog
cuts stalled streams exactly as for any call; the caller builds no SDK objects.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from broker.protocol import TICK, Response, Tick

from .sse import iter_batches


class _Usage(msgspec.Struct):
    input_tokens: int = -1
    output_tokens: int = -1
    prompt_tokens: int = -1
    completion_tokens: int = -1


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None  # legacy completions


class _ChatChunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


class _Message(msgspec.Struct):
    usage: _Usage | None = None


class _AnthropicEvent(msgspec.Struct):
    message: _Message | None = None  # message_start
    usage: _Usage | None = None  # message_delta
    error: dict[str, Any] | None = None


class _ResponsesEvent(msgspec.Struct):
    response: _Message | None = None  # response.completed
    error: dict[str, Any] | None = None
    code: str | None = None
    type: str = ""


_CHAT = msgspec.json.Decoder(_ChatChunk)
_ANTHROPIC = msgspec.json.Decoder(_AnthropicEvent)
_RESPONSES = msgspec.json.Decoder(_ResponsesEvent)


class _Counts:
    """What one read's events add up to."""

    __slots__ = ("tokens", "input_tokens", "output_tokens", "error")

    def __init__(self) -> None:
        self.tokens, self.input_tokens, self.output_tokens, self.error = 0, -1, -1, ""

    def usage(self, usage: _Usage | None) -> None:
        if usage is not None:
            self.input_tokens = max(usage.input_tokens, usage.prompt_tokens, self.input_tokens)
            self.output_tokens = max(usage.output_tokens, usage.completion_tokens, self.output_tokens)


def _count(api: str, batch: list[tuple[str, bytes]]) -> _Counts:
    counts = _Counts()
    for name, data in batch:
        try:
            if api == "chat":
                chunk = _CHAT.decode(data)
                if any(_is_output(c) for c in chunk.choices):
                    counts.tokens += 1
                counts.usage(chunk.usage)
                if chunk.error is not None:
                    counts.error = str(chunk.error.get("type") or chunk.error.get("code") or "error")
            elif api == "messages":
                if name == "content_block_delta":
                    counts.tokens += 1
                elif name in ("message_start", "message_delta", "error"):
                    event = _ANTHROPIC.decode(data)
                    counts.usage(event.usage or (event.message.usage if event.message else None))
                    if event.error is not None:
                        counts.error = str(event.error.get("type") or "error")
            elif name.endswith(".delta"):
                counts.tokens += 1
            elif name in ("response.completed", "response.incomplete", "response.failed", "error"):
                event = _RESPONSES.decode(data)
                counts.usage(event.response.usage if event.response else None)
                if name in ("error", "response.failed"):
                    counts.error = str(event.code or (event.error or {}).get("code") or event.type or "error")
        except msgspec.DecodeError:
            counts.error = counts.error or "unreadable_event"
    return counts


def _is_output(choice: _Choice) -> bool:
    delta = choice.delta
    if delta is not None:
        return bool(delta.content or delta.reasoning_content or delta.tool_calls)
    return bool(choice.text)


def api_of(kind: str, route: str) -> str:
    """Which stream format a route speaks: messages, chat or responses."""
    if kind == "anthropic":
        return "messages"
    return "responses" if route.endswith("/responses") else "chat"


async def time_stream(http: Any, emit: Any, api: str, sent: int) -> None:
    """Send a `Tick` for the head and for each read of the stream; a plain (non-stream)
    answer is relayed as it is, after a head tick, so the caller still knows when it came."""
    head = Tick(time.monotonic_ns(), sent=sent, status=http.status_code)
    await emit.events([(TICK, msgspec.msgpack.encode(head))])
    if not http.headers.get("content-type", "").startswith("text/event-stream"):
        body = await http.aread()
        await emit.result(Response(http.status_code, list(http.headers.items()), body))
        return
    arrived = 0

    async def stamped() -> Any:
        nonlocal arrived
        async for chunk in http.aiter_bytes():
            arrived = time.monotonic_ns()  # before any parsing
            yield chunk

    async for batch in iter_batches(stamped()):
        counts = _count(api, batch)
        tick = Tick(arrived, counts.tokens, output_tokens=counts.output_tokens, input_tokens=counts.input_tokens,
                    error=counts.error)  # fmt: skip
        await emit.events([(TICK, msgspec.msgpack.encode(tick))])
    await emit.result(None)
