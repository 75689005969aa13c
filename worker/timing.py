"""Timing a load test's stream where its bytes arrive, instead of relaying its events.

A `TimedCall` is sent like any other HTTP call, but what goes back to the caller is one
`Tick` per read of the stream: the arrival time taken here, before anything is parsed or
relayed, the number of output deltas in that read, and the usage and errors once the
provider reports them; the caller builds no SDK objects. A stream without output for its
stale timeout is ended here with STALLED (the worker's other streams go on); the broker's
watchdog, set later, still kills a worker that hangs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from broker.protocol import TICK, Code, ErrorInfo, Response, Tick, TimedCall, Usage

from .exchange import send
from .sse import iter_batches


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None  # legacy completions


class _ChatChunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: Usage | None = None
    error: dict[str, Any] | None = None


class _Message(msgspec.Struct):
    usage: Usage | None = None


class _AnthropicEvent(msgspec.Struct):
    message: _Message | None = None  # message_start
    usage: Usage | None = None  # message_delta
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

    def usage(self, usage: Usage | None) -> None:
        if usage is not None:
            self.input_tokens = max(usage.input, self.input_tokens)
            self.output_tokens = max(usage.output, self.output_tokens)


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


async def run_timed(sdk: Any, http: Any, kind: str, call: TimedCall, emit: Any, allow_overrides: bool) -> None:
    """Send a load test's request and time its answer: a `Tick` for the head and for each read of
    a stream; a plain (non-stream) answer is relayed as it is, after the head tick."""
    sent = time.monotonic_ns()
    response = await send(sdk, http, call.http, call.http.body, allow_overrides)
    try:
        head = Tick(time.monotonic_ns(), sent=sent, status=response.status_code)
        await emit.events([(TICK, msgspec.msgpack.encode(head))])
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            await _time_stream(response, emit, api_of(kind, call.http.path.split("?", 1)[0]), call)
        else:
            body = await response.aread()
            await emit.result(Response(response.status_code, list(response.headers.items()), body))
    finally:
        await response.aclose()


async def _time_stream(response: Any, emit: Any, api: str, call: TimedCall) -> None:
    arrived = 0

    async def stamped() -> Any:
        nonlocal arrived
        async for chunk in response.aiter_bytes():
            arrived = time.monotonic_ns()  # before any parsing
            yield chunk

    loop = asyncio.get_running_loop()
    events = tokens = 0
    try:  # pings and comments do not move the timer: only real events do
        async with asyncio.timeout(call.first_event_timeout) as timer:
            async for batch in iter_batches(stamped()):
                timer.reschedule(loop.time() + call.stale_timeout)
                events += 1
                counts = _count(api, batch)
                tokens += counts.tokens
                tick = Tick(arrived, counts.tokens, output_tokens=counts.output_tokens,
                            input_tokens=counts.input_tokens, error=counts.error)  # fmt: skip
                await emit.events([(TICK, msgspec.msgpack.encode(tick))])
    except TimeoutError:
        what = f"stale_timeout: no output for {call.stale_timeout:g}s" if events else (
            f"first_event_timeout: no event in {call.first_event_timeout:g}s")  # fmt: skip
        await emit.error(ErrorInfo(Code.STALLED, f"{what} after {tokens} tokens"))
        return
    await emit.result(None)
