"""A first call run in the zygote, before any fork, so that no worker's first real call pays for it.

A forked worker's first call cost 10-30 ms more than its second (2 cores): the SDK builds its request
option models, the HTTP library its client machinery, and the worker's stream check its decoders, each
on first use. That lands on exactly the calls that must be quick: the retry of a stalled stream runs on
a worker that has served nothing yet. So the zygote runs one streamed call of each SDK it preloads,
through the same code a worker runs (`run_call`), against an in-memory transport of the SDK's own HTTP
library (no socket, no thread, no DNS), and drops everything before it forks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from broker.sdklib import library

from . import sdks
from .calls import run_call

log = logging.getLogger(__name__)

_ANTHROPIC = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_warm","type":"message",'
    b'"role":"assistant","model":"warm-up","content":[],"stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":1,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: ping\ndata: {"type":"ping"}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"ok"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":1}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)
_OPENAI = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"warm-up","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":"ok"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"warm-up","choices":[{"index":0,'
    b'"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"warm-up","choices":[],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)
# per SDK: the method a worker runs most, its arguments, and the stream the in-memory provider answers
_CALLS = {
    "anthropic": ("messages.create", {"model": "warm-up", "max_tokens": 1}, _ANTHROPIC),
    "openai": ("chat.completions.create", {"model": "warm-up"}, _OPENAI),
}


class _Discard:
    """An emitter that sends nothing: the warm-up's output has no reader."""

    async def _nothing(self, *_: Any) -> None:
        return None

    head = events = error_event = progress = ending = usage = result = error = _nothing


def warm_up(families: tuple[str, ...]) -> None:
    """One streamed and one plain (assembled) call per SDK family, on a throwaway client. A warm-up that
    fails (an SDK generation that builds its clients otherwise) costs the first calls their speed only."""
    try:
        asyncio.run(_calls(families))
    except Exception:
        log.warning("warming up %s failed; workers' first calls will be slower", ", ".join(families), exc_info=True)


def _provider(http: Any, stream: bytes) -> Any:
    """An in-memory provider answering every request with `stream`."""
    return lambda _: http.Response(200, headers={"content-type": "text/event-stream"}, content=stream)


async def _calls(families: tuple[str, ...]) -> None:
    for family in families:
        method, args, stream = _CALLS[family]
        http = library(family)
        transport = http.MockTransport(_provider(http, stream))
        sdk = sdks.load(family)
        async with http.AsyncClient(transport=transport) as client:
            sdk_client = sdk.client(api_key="warm-up", base_url="http://warm-up.invalid", http_client=client)
            messages = [{"role": "user", "content": "warm-up"}]
            for stream_flag in (True, False):
                await run_call(sdk_client, family, sdk.resource_type, method,
                               {**args, "messages": messages, "stream": stream_flag}, _Discard())  # fmt: skip
