"""The `--sdk` measurement path: requests go through the official SDK (the drop-in shim's
clients, over the same pool), and each event is timed in the generator when the SDK hands
it over parsed, so the figures include what applications pay for the SDK's parsing. The
fast path (ticks from the worker) shows what the target does; this one, what an
application built on the SDK sees."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import msgspec
import openai

from ..protocol import Usage
from ..shim import AsyncAnthropic, AsyncOpenAI
from .measure import Measurement
from .workload import Turn

_STATUS = (anthropic.APIStatusError, openai.APIStatusError)
_TIMEOUT = (anthropic.APITimeoutError, openai.APITimeoutError)
_CONNECTION = (anthropic.APIConnectionError, openai.APIConnectionError)
_API_ERROR = (anthropic.APIError, openai.APIError)


class SdkPath:
    """The shim's async client of the API's SDK, with the SDK's own retries off (a load test counts every
    failure), and the measurement of each request through it."""

    def __init__(self, api: str, pool_url: str, profile: str) -> None:
        cls = AsyncAnthropic if api == "messages" else AsyncOpenAI
        self.api, self.client = api, cls(pool=pool_url, pool_profile=profile, max_retries=0)

    async def measure(self, turn: Turn, m: Measurement) -> None:
        await measure(self.client, self.api, turn, m)

    async def close(self) -> None:
        await self.client.close()


async def measure(client: Any, api: str, turn: Turn, m: Measurement) -> None:
    body = dict(turn.body)
    stream = bool(body.pop("stream", False))
    create = client.messages.create if api == "messages" else (
        client.chat.completions.create if api == "chat" else client.responses.create)  # fmt: skip
    m.sent = time.monotonic_ns()
    try:
        if not stream:
            body.pop("stream_options", None)
            answer = await create(**body)
            m.head = now = time.monotonic_ns()
            m.plain(now, *_usage(getattr(answer, "usage", None)))
            m.finish(now, 200)
            return
        events = await create(**body, stream=True)
        m.head = time.monotonic_ns()
        async for event in events:
            tokens, output, given, cached, created = _read(api, event)
            m.observe(time.monotonic_ns(), tokens, output, given, "", cached, created)
        m.finish(time.monotonic_ns(), 200)  # ends at its last event; received now
    except _STATUS as exc:
        m.status = exc.status_code
        m.end_with(time.monotonic_ns(), "http_error", f"HTTP {exc.status_code}")
    except _TIMEOUT as exc:  # the pool cut a stalled stream (before or after output)
        m.end_with(time.monotonic_ns(), "stall", str(exc))
    except _CONNECTION as exc:
        m.end_with(time.monotonic_ns(), "connection", str(exc))
    except _API_ERROR as exc:  # an `error` event in the stream
        m.end_with(time.monotonic_ns(), "stream_error", str(exc))


_NOTHING = (-1, -1, -1, -1)


def _read(api: str, event: Any) -> tuple[int, int, int, int, int]:
    """(output deltas, output tokens, input tokens, cached input, input written to the cache) of one parsed
    event (-1: not reported here)."""
    if api == "chat":
        delta = event.choices[0].delta if event.choices else None
        tokens = int(bool(delta and (delta.content or getattr(delta, "reasoning_content", None) or delta.tool_calls)))
        return (tokens, *_usage(event.usage))
    kind = getattr(event, "type", "")
    if api == "messages":
        if kind == "content_block_delta":
            return 1, *_NOTHING
        if kind == "message_start":
            return (0, *_usage(event.message.usage))
        if kind == "message_delta":
            return 0, event.usage.output_tokens, -1, -1, -1
        return 0, *_NOTHING
    if kind.endswith(".delta"):
        return 1, *_NOTHING
    if kind == "response.completed":
        return (0, *_usage(event.response.usage))
    return 0, *_NOTHING


def _usage(usage: Any) -> tuple[int, int, int, int]:
    """(output, input, cached input, input written to the cache) tokens of an SDK usage object, whichever
    API's names it uses: the SDKs' models have the wire's fields, so the wire's own reading applies."""
    if usage is None:
        return _NOTHING
    wire = msgspec.convert(usage.model_dump(exclude_none=True), Usage)
    return wire.output, wire.input, wire.cached, wire.cache_creation
