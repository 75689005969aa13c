"""Deterministic replies: the same request body always produces the same bytes.

A test can then check that a retried answer is complete and byte-identical to an
unfaulted one, because ids, timestamps and text are all derived from the body.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from .prefill import conversation, remainder
from .prefix_cache import PrefixCache

_WORDS = (
    "the pool kills stalled streams and retries them on a fresh worker so nothing hangs "
    "while keep alive pings arrive every process starts clean from the zygote and answers once"
).split()

FIXED_CREATED = 1_767_225_600  # 2026-01-01, so that retried answers are byte-identical


class Reply:
    """The text, ids and token counts of one answer; with a prefix cache, how much of the prompt it held
    (the prompt's blocks are kept there as it is read)."""

    def __init__(
        self,
        body: dict[str, Any],
        tokens: int,
        cache: PrefixCache | None = None,
        prefill: str | None = None,
        serve: int | None = None,
    ) -> None:
        """`prefill`: the assistant turn that ends an Anthropic conversation, which the answer continues;
        `serve`: how many times the conversation was answered before, for an answer that varies (a
        sampling model's: the `vary` fault), None for the same answer every time."""
        digest = self.key = body_key(body if serve is None else {**body, "isopool-serve": serve})
        rng = random.Random(digest)
        limit = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
        count = max(1, min(tokens, int(limit))) if limit else max(1, tokens)
        self.tool = _tool_to_call(body)
        self.tool_input: Any = None
        schema = _json_schema(body)
        if self.tool is not None:  # a tool call, its JSON arguments streamed in pieces
            self.tool_input = sample(self.tool[1], rng)
            text = json.dumps(self.tool_input)
            self.pieces = [text[i : i + 8] for i in range(0, len(text), 8)]
            count, limit = len(self.pieces), None
        elif schema is not None:  # structured output: a JSON value of the schema, streamed in pieces
            text = json.dumps(sample(schema, rng))
            self.pieces = [text[i : i + 8] for i in range(0, len(text), 8)]
            count, limit = len(self.pieces), None
        else:
            self.pieces = [("" if i == 0 else " ") + rng.choice(_WORDS) for i in range(count)]
        self.stopped_by_limit = bool(limit) and count < tokens
        if prefill is not None and self.tool is None and schema is None:
            if (rest := self._continued(body, tokens, prefill, serve)) is not None:
                self.pieces, count = rest, len(rest)
        self.text = "".join(self.pieces)
        self.model = str(body.get("model", "fake-model"))
        words = json.dumps(body.get("messages", body.get("input", ""))).split()
        self.input_tokens = max(1, len(words))
        self.cached_tokens, self.cache_writes = cache.admit(self.model, words) if cache is not None else (0, 0)
        self.output_tokens = count
        self.refused = False  # a content filter stopped it (Anthropic's `stop_reason: refusal`)

    @staticmethod
    def _continued(body: dict[str, Any], tokens: int, prefill: str, serve: int | None) -> list[str] | None:
        """The rest of the answer the conversation without its assistant turn gets, if that answer
        starts with the turn's text."""
        return remainder(Reply(conversation(body), tokens, serve=serve).pieces, prefill)

    def ident(self, prefix: str) -> str:
        return f"{prefix}{self.key[:24]}"


def body_key(body: dict[str, Any]) -> str:
    """A digest of what decides the answer to `body`."""
    return hashlib.sha256(json.dumps(_content_key(body), sort_keys=True).encode()).hexdigest()


def _content_key(body: dict[str, Any]) -> dict[str, Any]:
    """What decides the answer: everything but transport flags."""
    return {k: v for k, v in body.items() if k not in ("stream", "stream_options")}


def _tool_to_call(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(name, JSON schema) of the tool to call: each offered tool once, in order, one per turn
    (an agent loop of len(tools) + 1 turns); then the model answers in text."""
    tools = body.get("tools") or []
    if not tools or body.get("tool_choice") in ("none", {"type": "none"}):
        return None
    turns = body.get("messages") or (body["input"] if isinstance(body.get("input"), list) else [])
    results = sum(_tool_results(turn) for turn in turns if isinstance(turn, dict))
    if results >= len(tools):
        return None
    tool = tools[results]
    function = tool.get("function", tool)  # Chat Completions nests the function
    return function["name"], tool.get("input_schema") or function.get("parameters") or {}


def _tool_results(turn: dict[str, Any]) -> int:
    """Tool results a conversation turn carries, in any of the three APIs' shapes."""
    if turn.get("role") == "tool" or turn.get("type") == "function_call_output":
        return 1
    content = turn.get("content")
    return sum(1 for c in content if isinstance(c, dict) and c.get("type") == "tool_result") if isinstance(
        content, list) else 0  # fmt: skip


def _json_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema a Chat Completions (`response_format`) or Responses (`text.format`) call asks for."""
    fmt = body.get("response_format") or (body.get("text") or {}).get("format") or {}
    if fmt.get("type") != "json_schema":
        return None
    return fmt.get("json_schema", {}).get("schema") or fmt.get("schema") or {}


def sample(schema: dict[str, Any], rng: random.Random, defs: dict[str, Any] | None = None) -> Any:
    """A deterministic value that validates against a (pydantic-made) JSON schema."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return sample(defs[schema["$ref"].rsplit("/", 1)[1]], rng, defs)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return sample(schema[key][0], rng, defs)
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        return {name: sample(sub, rng, defs) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [sample(schema.get("items", {}), rng, defs) for _ in range(2)]
    if kind == "integer":
        return rng.randint(1, 99)
    if kind == "number":
        return rng.randint(1, 99) / 4
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return rng.choice(_WORDS)
