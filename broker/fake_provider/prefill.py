"""Assistant prefill, as Anthropic's models take it: a conversation that ends with an assistant turn
is continued from that turn's text, and the answer holds only the continuation.

Newer Claude models refuse prefill with a 400; a model of the fake refuses it when its name (before
any `@fault`) ends in `-noprefill`, e.g. `claude-fake-noprefill`. Every model refuses a prefill that
ends with whitespace, as the real API does. The continuation is the rest of the answer that the
same request without the assistant turn gets (see `content.py`), so that a stream cut short and
continued from what it delivered reads as the whole answer.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .errors import prefill_rejected, trailing_whitespace

NO_PREFILL = "-noprefill"


def prefill_text(body: dict[str, Any]) -> str | None:
    """The text of the assistant turn that ends the conversation, or None if a user turn ends it."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(last := messages[-1], dict):
        return None
    if last.get("role") != "assistant":
        return None
    content = last.get("content")
    if isinstance(content, list):
        return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text")
    return content if isinstance(content, str) else ""


def conversation(body: dict[str, Any]) -> dict[str, Any]:
    """The request without the assistant turn that ends it, if one does: a prefilled continuation is
    of the same conversation (faults are counted by it, so that a continuation is not cut again)."""
    return {**body, "messages": body["messages"][:-1]} if prefill_text(body) is not None else body


def refusal(body: dict[str, Any]) -> web.Response | None:
    """The 400 a prefilled request gets from its model, or None if the model takes it."""
    text = prefill_text(body)
    if text is None:
        return None
    if str(body.get("model", "")).partition("@")[0].endswith(NO_PREFILL):
        return prefill_rejected()
    return trailing_whitespace() if text != text.rstrip() else None


def remainder(pieces: list[str], text: str) -> list[str] | None:
    """The pieces of an answer that follow `text`, if the answer starts with it (None if not)."""
    if not "".join(pieces).startswith(text):
        return None
    rest, taken = [], 0
    for piece in pieces:
        if taken + len(piece) > len(text):
            rest.append(piece[max(0, len(text) - taken) :])
        taken += len(piece)
    return rest
