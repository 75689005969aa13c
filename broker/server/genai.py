"""What the GenAI semantic conventions ask of a call that only its payload says: the request's
parameters (`gen_ai.request.*`, `gen_ai.output.type`) and, when explicitly enabled, its messages
(`gen_ai.input.messages`, `gen_ai.system_instructions`, `gen_ai.output.messages`).

The broker forwards payloads unparsed; these are read only with tracing (parameters) or content
capture on, once per request, by msgspec decoders that name just the fields wanted and skip the
rest (the messages, for the parameters) without building them. Content is cut to CONTENT_CHARS
characters of text per attribute; of the answer only its text is kept (a tool call or an image is
a part of its type without its data).
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

CONTENT_CHARS = 16_384  # characters of message text kept per attribute (and per request log field)
_OUTPUT_BYTES = 4 * CONTENT_CHARS  # raw answer kept per attempt to read the text from: past it, no more


def capture_content() -> bool:
    """Whether the environment opts in to message content: OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT
    set to `true` (the older switch) or to SPAN_ONLY / SPAN_AND_EVENT (opentelemetry-util-genai's values)."""
    value = os.environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").strip().lower()
    return value in ("true", "1", "span_only", "span_and_event")


class _Format(msgspec.Struct):
    type: str = ""


class _Text(msgspec.Struct):
    format: _Format | None = None


class _Params(msgspec.Struct):
    """The sampling parameters of the Anthropic Messages, OpenAI Chat Completions and Responses APIs."""

    max_tokens: int | None = None  # Anthropic; Chat Completions (older name)
    max_completion_tokens: int | None = None  # Chat Completions
    max_output_tokens: int | None = None  # Responses
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # Anthropic
    stop_sequences: list[str] | None = None  # Anthropic
    stop: str | list[str] | None = None  # Chat Completions
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    n: int | None = None
    response_format: _Format | None = None  # Chat Completions: text, json_object, json_schema
    text: _Text | None = None  # Responses: text.format.type
    output_format: _Format | None = None  # Anthropic's structured outputs


class _SdkParams(msgspec.Struct, tag="sdk"):
    kwargs: _Params = msgspec.field(default_factory=_Params)


class _HttpBody(msgspec.Struct, tag="http"):
    body: bytes = b""


class _Timed(msgspec.Struct, tag="timed"):
    pass


_ENVELOPE = msgspec.msgpack.Decoder(_SdkParams | _HttpBody | _Timed)
_BODY = msgspec.json.Decoder(_Params)


def _fields(payload: bytes, envelope: msgspec.msgpack.Decoder, body: msgspec.json.Decoder) -> Any:
    """The fields `envelope` and `body` name, of an SDK call's kwargs or an HTTP call's JSON body;
    None for another payload, or one that does not decode (a parameter its API refuses)."""
    try:
        call = envelope.decode(payload)
        if isinstance(call, _HttpBody):
            return body.decode(call.body) if call.body else None
        return getattr(call, "kwargs", None)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def request_attributes(payload: bytes) -> dict[str, Any]:
    """The call's `gen_ai.request.*` attributes (and `gen_ai.output.type`), those it set."""
    params = _fields(payload, _ENVELOPE, _BODY)
    if params is None:
        return {}
    stop = [params.stop] if isinstance(params.stop, str) else params.stop
    found = {
        "gen_ai.request.max_tokens": _first(params.max_tokens, params.max_completion_tokens, params.max_output_tokens),
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
        "gen_ai.request.top_k": params.top_k,
        "gen_ai.request.stop_sequences": params.stop_sequences or stop,
        "gen_ai.request.frequency_penalty": params.frequency_penalty,
        "gen_ai.request.presence_penalty": params.presence_penalty,
        "gen_ai.request.seed": params.seed,
        "gen_ai.request.choice.count": params.n if params.n != 1 else None,  # the conventions: only when not 1
        "gen_ai.output.type": _output_type(params),
    }
    return {key: value for key, value in found.items() if value is not None}


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _output_type(params: _Params) -> str | None:
    """`json` or `text` when the call asked for a format (the conventions' well-known values)."""
    asked = params.response_format or params.output_format or (params.text.format if params.text else None)
    if asked is None or not asked.type:
        return None
    return "text" if asked.type == "text" else "json"


# ----- content (opt-in) ---------------------------------------------------------


class _Messages(msgspec.Struct):
    messages: list[Any] | None = None  # Anthropic, Chat Completions
    system: Any = None  # Anthropic: a string or text blocks
    input: Any = None  # Responses: a string or items
    instructions: Any = None  # Responses


class _SdkMessages(msgspec.Struct, tag="sdk"):
    kwargs: _Messages = msgspec.field(default_factory=_Messages)


_MESSAGES_ENVELOPE = msgspec.msgpack.Decoder(_SdkMessages | _HttpBody | _Timed)
_MESSAGES_BODY = msgspec.json.Decoder(_Messages)


class _Budget:
    """Characters of text left for one attribute."""

    def __init__(self) -> None:
        self.left = CONTENT_CHARS

    def text(self, text: str) -> dict[str, str]:
        kept, self.left = text[: self.left], max(0, self.left - len(text))
        return {"type": "text", "content": kept}


def input_content(payload: bytes) -> tuple[list[dict], list[dict]]:
    """The call's (input messages, system instructions) in the conventions' shape ({"role", "parts"});
    empty lists for a payload that says none."""
    found = _fields(payload, _MESSAGES_ENVELOPE, _MESSAGES_BODY)
    if found is None:
        return [], []
    budget = _Budget()
    items = found.messages if found.messages is not None else found.input
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    messages = [
        {"role": str(item.get("role", "user")), "parts": _parts(item.get("content"), budget)}
        for item in items or []
        if isinstance(item, dict)
    ]
    system = found.system if found.system is not None else found.instructions
    return messages, _parts(system, _Budget())


def _parts(content: Any, budget: _Budget) -> list[dict]:
    """A message's content as parts: text as text, any other block as a part of its type only."""
    if content is None:
        return []
    if isinstance(content, str):
        return [budget.text(content)]
    parts = []
    for block in content if isinstance(content, list) else [content]:
        if isinstance(block, str):
            parts.append(budget.text(block))
        elif isinstance(block, dict) and isinstance(block.get("text"), str):
            parts.append(budget.text(block["text"]))
        elif isinstance(block, dict):
            parts.append({"type": str(block.get("type", ""))})
    return parts


class Output:
    """An attempt's answer as the broker passed it on (event batches, or a whole response), kept up to
    _OUTPUT_BYTES to read its text from when the attempt ends."""

    __slots__ = ("kept", "size")

    def __init__(self) -> None:
        self.kept: list[bytes] = []
        self.size = 0

    def add(self, payload: bytes) -> None:
        if self.size < _OUTPUT_BYTES:
            self.kept.append(payload)
            self.size += len(payload)

    def messages(self, finish_reasons: list[str]) -> list[dict]:
        """The answer's text, one assistant message per choice, in the conventions' shape."""
        texts: dict[int, list[str]] = {}
        for payload in self.kept:
            try:
                decoded = msgspec.msgpack.decode(payload)
            except msgspec.DecodeError:
                continue
            if isinstance(decoded, list):  # a batch of stream events: [name, data] pairs
                for _, data in decoded:
                    _stream_text(_json(data), texts)
            elif isinstance(decoded, dict) and decoded.get("body"):  # a whole response
                _response_text(_json(decoded["body"]), texts)
        budget = _Budget()
        return [
            {"role": "assistant", "parts": [budget.text("".join(texts[i]))],
             "finish_reason": finish_reasons[i] if i < len(finish_reasons) else ""}
            for i in sorted(texts)
        ]  # fmt: skip


def _json(data: Any) -> Any:
    try:
        return msgspec.json.decode(data)
    except (msgspec.DecodeError, TypeError):
        return None


def _stream_text(event: Any, texts: dict[int, list[str]]) -> None:
    """The text of one stream event: Anthropic's text_delta, a Chat Completions delta, a Responses
    output_text delta."""
    if not isinstance(event, dict):
        return
    delta = event.get("delta")
    if event.get("type") == "content_block_delta" and isinstance(delta, dict) and isinstance(delta.get("text"), str):
        texts.setdefault(0, []).append(delta["text"])
    elif event.get("type") == "response.output_text.delta" and isinstance(delta, str):
        texts.setdefault(0, []).append(delta)
    for choice in event.get("choices") or []:
        if isinstance(choice, dict) and isinstance(choice.get("delta"), dict):
            content = choice["delta"].get("content")
            if isinstance(content, str):
                texts.setdefault(int(choice.get("index") or 0), []).append(content)


def _response_text(body: Any, texts: dict[int, list[str]]) -> None:
    """The text of a whole answer: Anthropic's content blocks, Chat Completions' choices, Responses' output."""
    if not isinstance(body, dict):
        return
    for block in body.get("content") or []:
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            texts.setdefault(0, []).append(block["text"])
    for choice in body.get("choices") or []:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            texts.setdefault(int(choice.get("index") or 0), []).append(message["content"])
    for item in body.get("output") or []:
        for block in (item.get("content") or []) if isinstance(item, dict) else []:
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                texts.setdefault(0, []).append(block["text"])
