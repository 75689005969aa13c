"""Turn the raw events of a stream back into the body the non-streaming API returns.

A "non-streaming" call is run as a stream inside the worker so that a stall is caught
for it too; these accumulators work on the provider's JSON directly (no SDK models),
so the result is the JSON the caller would have received without streaming.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_DEC = msgspec.json.Decoder()


class ProviderStreamError(Exception):
    """A mid-stream `error` event; `body` is the provider's error JSON."""

    def __init__(self, body: Any) -> None:
        super().__init__(str(body))
        self.body = body


class AnthropicMessage:
    """Accumulates Messages API events into a `message` object."""

    def __init__(self) -> None:
        self.message: dict[str, Any] = {}
        self._json: dict[int, str] = {}

    def feed(self, name: str, data: bytes) -> None:
        event = _DEC.decode(data)
        kind = event.get("type", name)
        if kind == "message_start":
            self.message = event["message"]
        elif kind == "content_block_start":
            self.message["content"].append(event["content_block"])
        elif kind == "content_block_delta":
            self._delta(event["index"], event["delta"])
        elif kind == "content_block_stop":
            index = event["index"]
            if index in self._json:
                raw = self._json.pop(index)
                self.message["content"][index]["input"] = json.loads(raw) if raw else {}
        elif kind == "message_delta":
            self.message.update(event.get("delta", {}))
            usage = {k: v for k, v in (event.get("usage") or {}).items() if v is not None}
            self.message.setdefault("usage", {}).update(usage)
        elif kind == "error":
            raise ProviderStreamError(event)

    def _delta(self, index: int, delta: dict[str, Any]) -> None:
        block = self.message["content"][index]
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] = block.get("text", "") + delta["text"]
        elif kind == "input_json_delta":
            self._json[index] = self._json.get(index, "") + delta.get("partial_json", "")
        elif kind == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + delta["thinking"]
        elif kind == "signature_delta":
            block["signature"] = delta["signature"]
        elif kind == "citations_delta":
            block.setdefault("citations", []).append(delta["citation"])

    def result(self) -> Any:
        return self.message


class OpenAIChatCompletion:
    """Accumulates Chat Completions chunks into a `chat.completion` object."""

    def __init__(self) -> None:
        self.completion: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}

    def feed(self, name: str, data: bytes) -> None:
        chunk = _DEC.decode(data)
        if "error" in chunk and "choices" not in chunk:
            raise ProviderStreamError(chunk)
        if not self.completion:
            self.completion = {k: v for k, v in chunk.items() if k not in ("choices", "usage", "object")}
            self.completion["object"] = "chat.completion"
        if chunk.get("usage") is not None:
            self.completion["usage"] = chunk["usage"]
        for delta_choice in chunk.get("choices", []):
            choice = self.choices.setdefault(
                delta_choice["index"],
                {
                    "index": delta_choice["index"],
                    "message": {"role": "assistant", "content": None},
                    "finish_reason": None,
                },
            )
            if delta_choice.get("finish_reason") is not None:
                choice["finish_reason"] = delta_choice["finish_reason"]
            if "logprobs" in delta_choice:
                choice["logprobs"] = delta_choice["logprobs"]
            self._merge(choice["message"], delta_choice.get("delta") or {})

    @staticmethod
    def _merge(message: dict[str, Any], delta: dict[str, Any]) -> None:
        for key, value in delta.items():
            if key == "tool_calls":
                calls = message.setdefault("tool_calls", [])
                for call in value:
                    while len(calls) <= call["index"]:
                        calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                    target = calls[call["index"]]
                    target["id"] = call.get("id") or target["id"]
                    fn = call.get("function") or {}
                    target["function"]["name"] += fn.get("name") or ""
                    target["function"]["arguments"] += fn.get("arguments") or ""
            elif isinstance(value, str) and key in ("content", "refusal"):
                message[key] = (message.get(key) or "") + value
            elif value is not None or key not in message:
                message[key] = value

    def result(self) -> Any:
        return {**self.completion, "choices": [self.choices[i] for i in sorted(self.choices)]}


class OpenAIResponse:
    """The Responses API's `response.completed` event already carries the whole response."""

    def __init__(self) -> None:
        self.response: Any = None

    def feed(self, name: str, data: bytes) -> None:
        if name in ("response.completed", "response.incomplete", "response.failed"):
            self.response = _DEC.decode(data)["response"]
        elif name == "error":
            raise ProviderStreamError(_DEC.decode(data))

    def result(self) -> Any:
        return self.response
