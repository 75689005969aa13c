"""Stream hygiene: how each API's stream ends, and which of its `data:` lines are not events at all.

A stream whose bytes end cleanly but without its terminal event (Anthropic `message_stop`, Chat
Completions' finish reason or `[DONE]`, Responses' `response.completed`) was cut short: the SDKs
would hand the caller a truncated answer as if it were whole, so it ends in StreamIncomplete here.
A stream that did say it finished but never closes (a Chat Completions server that forgets its
`[DONE]`) is ended a moment later, with what it sent, instead of waiting out the stale timeout.
A `data:` line that is not JSON would fail the caller's SDK in the middle of an answer that is
otherwise intact: it is dropped, counted, and logged once per request.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from .usage import ANTHROPIC, CHAT, RESPONSES, AnthropicEvent, ChatChunk, Facts, ResponsesEvent

log = logging.getLogger(__name__)

# How long a stream that said it finished may take to send `[DONE]` or close. A healthy server sends
# them in the same breath; waiting a little for them lets the connection be used again.
GRACE = 1.0

# The SDK method paths of Anthropic Messages, one API with one stream: anthropic 0.40 also has prompt
# caching's beta resource (gone from 0.41, when it became generally available).
ANTHROPIC_MESSAGES = ("messages.create", "beta.messages.create", "beta.prompt_caching.messages.create")


class StreamIncomplete(Exception):
    """The provider's stream ended without its terminal event."""


class StreamCheck:
    """Passes every event on and expects no particular end: for streams whose API it does not know."""

    decoder: msgspec.json.Decoder | None = None
    terminal = "its end"

    def __init__(self) -> None:
        self.ended = False  # the terminal event was seen: what may follow is only `[DONE]` or the close
        self.told = False  # the broker was told so (Kind.ENDING)
        self.malformed = 0
        self.facts = Facts()  # what the answer says of itself (usage, id, model), read from the same decode

    def filter(self, batch: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """The events of `batch` that are JSON, each looked at for the end of the stream."""
        if self.decoder is None:
            return batch
        kept = []
        for name, data in batch:
            try:
                self.see(name, self.decoder.decode(data))
            except msgspec.ValidationError:  # JSON of another shape: the caller's SDK may know it
                pass
            except msgspec.DecodeError:
                self._drop(data)
                continue
            kept.append((name, data))
        return kept

    def see(self, name: str, event: Any) -> None:
        """Note whether `event` ends the stream."""

    def saw_done(self) -> None:
        self.ended = True

    def finish(self) -> None:
        """The bytes ended: raise StreamIncomplete unless the stream said it was complete."""
        if not self.ended and self.decoder is not None:
            raise StreamIncomplete(f"the provider's stream ended without {self.terminal}: the answer may be cut short")

    def _drop(self, data: bytes) -> None:
        self.malformed += 1
        if self.malformed == 1:
            log.warning("dropped a malformed event (not JSON) from the provider's stream: %r", data[:120])


class AnthropicCheck(StreamCheck):
    decoder = ANTHROPIC
    terminal = "message_stop"

    def see(self, name: str, event: AnthropicEvent) -> None:
        self.ended = self.ended or event.type in ("message_stop", "error")
        if event.type in ("message_start", "message_delta"):
            self.facts.anthropic(event)


class ResponsesCheck(StreamCheck):
    decoder = RESPONSES
    terminal = "response.completed"
    _ENDS = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})

    def see(self, name: str, event: ResponsesEvent) -> None:
        self.ended = self.ended or event.type in self._ENDS
        if event.response is not None:
            self.facts.responses(event)


class ChatCheck(StreamCheck):
    """Ended once each of the `n` choices has its finish reason (the usage, when asked for, follows
    at once and is relayed if it comes within the grace), or at an error chunk."""

    decoder = CHAT
    terminal = "a finish_reason or [DONE]"

    def __init__(self, n: int = 1) -> None:
        super().__init__()
        self.n, self.finished = n, set()

    def see(self, name: str, event: ChatChunk) -> None:
        if event.error is not None:
            self.ended = True
        for choice in event.choices or ():
            if choice.finish_reason is not None:
                self.finished.add(choice.index)
                self.facts.finished(choice.finish_reason)
        self.ended = self.ended or len(self.finished) >= self.n
        if event.usage is not None or not self.facts.model:
            self.facts.chat(event)


def check_for(kind: str, method: str | None, args: dict[str, Any]) -> StreamCheck:
    """The check of a stream of SDK method `method` called with `args`."""
    if kind == "anthropic" and method in ANTHROPIC_MESSAGES:
        return AnthropicCheck()
    if kind == "openai" and method == "chat.completions.create":
        n = args.get("n")
        return ChatCheck(n if isinstance(n, int) and n > 0 else 1)
    if kind == "openai" and method == "responses.create":
        return ResponsesCheck()
    return StreamCheck()
