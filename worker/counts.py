"""What the events of one read of a load test's stream add up to: output deltas, the usage the
provider reported, a mid-stream error, whether the stream said it finished. The events are decoded
into the structs of worker/usage.py, which the stream check of the pool's other calls decodes into."""

from __future__ import annotations

from typing import Any

import msgspec

from broker.protocol import Usage

from .usage import ANTHROPIC, CHAT, RESPONSES, Choice


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
                chunk = CHAT.decode(data)
                choices = chunk.choices or ()
                if any(_is_output(c) for c in choices):
                    counts.tokens += 1
                counts.usage(chunk.usage)
                if chunk.error is not None:
                    counts.error = _error_type(chunk.error, "type", "code")
                counts.ended = counts.ended or chunk.error is not None or any(c.finish_reason for c in choices)
            elif api == "messages":
                if name == "content_block_delta":
                    counts.tokens += 1
                elif name == "message_stop":
                    counts.ended = True
                elif name in ("message_start", "message_delta", "error"):
                    event = ANTHROPIC.decode(data)
                    counts.usage(event.usage or (event.message.usage if event.message else None))
                    if event.error is not None:
                        counts.error = _error_type(event.error, "type")
                        counts.ended = True
            elif name.endswith(".delta"):
                counts.tokens += 1
            elif name in ("response.completed", "response.incomplete", "response.failed", "error"):
                counts.ended = True
                event = RESPONSES.decode(data)
                counts.usage(event.response.usage if event.response else None)
                if name in ("error", "response.failed"):
                    counts.error = event.code or _error_type(event.error, "code", default=event.type or "error")
        except msgspec.DecodeError:
            counts.error = counts.error or "unreadable_event"
    return counts


def _error_type(error: Any, *keys: str, default: str = "error") -> str:
    """What an error object says it is: the first of `keys` it has."""
    found = next((error[k] for k in keys if isinstance(error, dict) and error.get(k)), None)
    return str(found or default)


def _is_output(choice: Choice) -> bool:
    delta = choice.delta
    if delta is not None:
        return bool(delta.content or delta.reasoning_content or delta.tool_calls)
    return bool(choice.text)


def api_of(kind: str, route: str) -> str:
    """Which stream format a route speaks: messages, chat or responses."""
    if kind == "anthropic":
        return "messages"
    return "responses" if route.endswith("/responses") else "chat"
