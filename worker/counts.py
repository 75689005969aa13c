"""What the events of one read of a load test's stream add up to: output deltas, the usage the
provider reported, a mid-stream error, whether the stream said it finished. Only the fields that
say so are decoded."""

from __future__ import annotations

from typing import Any

import msgspec

from broker.protocol import Usage


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None  # legacy completions
    finish_reason: str | None = None


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


class Counts:
    """What one read's events add up to."""

    __slots__ = ("tokens", "input_tokens", "output_tokens", "cached_tokens", "cache_creation_tokens", "error",
                 "ended")  # fmt: skip

    def __init__(self) -> None:
        self.tokens, self.input_tokens, self.output_tokens, self.error = 0, -1, -1, ""
        self.cached_tokens = self.cache_creation_tokens = -1
        self.ended = False  # its terminal event came (see worker/hygiene.py): what follows is only usage or [DONE]

    def usage(self, usage: Usage | None) -> None:
        if usage is not None:
            self.input_tokens = max(usage.input, self.input_tokens)
            self.output_tokens = max(usage.output, self.output_tokens)
            self.cached_tokens = max(usage.cached, self.cached_tokens)
            self.cache_creation_tokens = max(usage.cache_creation, self.cache_creation_tokens)


def count(api: str, batch: list[tuple[str, bytes]]) -> Counts:
    counts = Counts()
    for name, data in batch:
        try:
            if api == "chat":
                chunk = _CHAT.decode(data)
                if any(_is_output(c) for c in chunk.choices):
                    counts.tokens += 1
                counts.usage(chunk.usage)
                if chunk.error is not None:
                    counts.error = str(chunk.error.get("type") or chunk.error.get("code") or "error")
                counts.ended = counts.ended or chunk.error is not None or any(c.finish_reason for c in chunk.choices)
            elif api == "messages":
                if name == "content_block_delta":
                    counts.tokens += 1
                elif name == "message_stop":
                    counts.ended = True
                elif name in ("message_start", "message_delta", "error"):
                    event = _ANTHROPIC.decode(data)
                    counts.usage(event.usage or (event.message.usage if event.message else None))
                    if event.error is not None:
                        counts.error = str(event.error.get("type") or "error")
                        counts.ended = True
            elif name.endswith(".delta"):
                counts.tokens += 1
            elif name in ("response.completed", "response.incomplete", "response.failed", "error"):
                counts.ended = True
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
