"""The events of the three streamed APIs as the worker decodes them, once each, and what an attempt's
answer says of itself: the provider's token usage, the response's id and model, its finish reasons.

The stream check (worker/hygiene.py) decodes every event into these structs to see where the stream
ends, and hands each to `Facts` on the way; the load test's counting (worker/counts.py) reads the same
structs. Only the fields that say so are decoded: a content delta's text is skipped, never copied.
Usage counts are cumulative in every API (Anthropic's `message_delta` repeats and raises its
`message_start`'s), so each count keeps the largest value reported.
"""

from __future__ import annotations

from typing import Any

import msgspec

from broker.protocol import MAX_TOKENS, Spent, Usage

_MOST_REASONS = 16  # finish reasons kept (one per choice): the USAGE header stays small whatever `n` is
_LONGEST = 256  # characters kept of a response id or model: the provider's strings, bounded
_REASON = 32  # ... of a finish reason: the whole USAGE header stays well under MAX_HEADER_BYTES


class Delta(msgspec.Struct):
    """A Chat Completions delta (its output fields), or Anthropic's `message_delta` delta (its stop reason)."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[Any] | None = None
    stop_reason: str | None = None


class Choice(msgspec.Struct):
    index: int = 0
    delta: Delta | None = None
    text: str | None = None  # legacy completions
    finish_reason: Any = None


class ChatChunk(msgspec.Struct):
    id: str | None = None
    model: str | None = None
    choices: list[Choice] | None = None
    usage: Usage | None = None
    error: Any = None


class Message(msgspec.Struct):
    """Anthropic's message (in `message_start`) or a Responses response object."""

    id: str | None = None
    model: str | None = None
    usage: Usage | None = None
    status: str | None = None  # Responses: completed, incomplete, failed


class AnthropicEvent(msgspec.Struct):
    type: str = ""
    message: Message | None = None  # message_start
    usage: Usage | None = None  # message_delta
    delta: Delta | None = None  # message_delta: the stop reason
    error: Any = None


class ResponsesEvent(msgspec.Struct):
    type: str = ""
    response: Message | None = None  # response.created, response.completed, ...
    error: Any = None
    code: str | None = None


class Body(msgspec.Struct):
    """A plain (non-streamed) answer of any of the APIs, or of another endpoint that reports usage."""

    id: str | None = None
    model: str | None = None
    usage: Usage | None = None
    choices: list[Choice] | None = None  # Chat Completions
    stop_reason: str | None = None  # Anthropic
    status: str | None = None  # Responses


CHAT = msgspec.json.Decoder(ChatChunk)
ANTHROPIC = msgspec.json.Decoder(AnthropicEvent)
RESPONSES = msgspec.json.Decoder(ResponsesEvent)
_BODY = msgspec.json.Decoder(Body)


class Facts:
    """What one attempt's answer has said of itself so far; `changed` until the worker sends it on."""

    __slots__ = ("input", "output", "cache_read", "cache_write", "id", "model", "finish", "changed")

    def __init__(self) -> None:
        self.input: int | None = None  # None: not reported (yet), which is not 0
        self.output: int | None = None
        self.cache_read: int | None = None
        self.cache_write: int | None = None
        self.id = self.model = ""
        self.finish: list[str] = []
        self.changed = False

    def usage(self, usage: Usage | None) -> None:
        if usage is None:
            return
        reported = (usage.input, usage.output, usage.cached, usage.cache_creation)  # -1: not in this report
        counts = tuple(_most(had, now) for had, now in zip(self._counts(), reported, strict=True))
        if counts != self._counts():
            self.input, self.output, self.cache_read, self.cache_write = counts
            self.changed = True

    def _counts(self) -> tuple[int | None, int | None, int | None, int | None]:
        return self.input, self.output, self.cache_read, self.cache_write

    def name(self, ident: str | None, model: str | None) -> None:
        if (ident and not self.id) or (model and not self.model):
            self.id, self.model = self.id or (ident or "")[:_LONGEST], self.model or (model or "")[:_LONGEST]
            self.changed = True

    def finished(self, reason: Any) -> None:
        if isinstance(reason, str) and len(self.finish) < _MOST_REASONS:
            self.finish.append(reason[:_REASON])
            self.changed = True

    def anthropic(self, event: AnthropicEvent) -> None:
        if event.type == "message_start" and event.message is not None:
            self.name(event.message.id, event.message.model)
            self.usage(event.message.usage)
        elif event.type == "message_delta":
            self.usage(event.usage)
            if event.delta is not None:
                self.finished(event.delta.stop_reason)

    def chat(self, chunk: ChatChunk) -> None:
        """A chunk's name and usage (its finish reasons are the check's to pass on, as it reads them)."""
        if not self.model:
            self.name(chunk.id, chunk.model)
        self.usage(chunk.usage)

    def responses(self, event: ResponsesEvent) -> None:
        response = event.response
        if response is not None:
            self.name(response.id, response.model)
            self.usage(response.usage)
            if event.type in ("response.completed", "response.incomplete", "response.failed"):
                self.finished(response.status)

    def body(self, data: bytes) -> None:
        """A plain answer's: read once, from its JSON (one that is not, or of another shape, says nothing)."""
        try:
            body = _BODY.decode(data)
        except msgspec.DecodeError:  # ValidationError too
            return
        self.name(body.id, body.model)
        self.usage(body.usage)
        for reason in [c.finish_reason for c in body.choices or ()] + [body.stop_reason, body.status]:
            self.finished(reason)

    def spent(self, rid: int) -> Spent:
        """The USAGE header that says these facts of request `rid`; sent, they are no longer `changed`."""
        self.changed = False
        return Spent(rid, self.input, self.output, self.cache_read, self.cache_write, self.id, self.model,
                     list(self.finish))  # fmt: skip


def _most(had: int | None, now: int) -> int | None:
    """A cumulative count after a report of `now` (-1: the report did not give it)."""
    if now < 0:
        return had
    return max(had or 0, min(MAX_TOKENS, now))
