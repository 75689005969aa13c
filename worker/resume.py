"""Continuing a stream that broke after output: the broker's `Resume` (see broker/server/resumes.py).

The caller already holds some events of the answer; this worker gets them back with the original call
and continues it so that the caller's SDK parses one message (one start, continuous block indices,
one end):
- prefill (Anthropic Messages, text only): the delivered text, less its trailing whitespace (which the
  API refuses), ends the conversation as an assistant turn; of the continuation, its `message_start` and
  the start of its first block are dropped, its block indices follow the caller's, its first text loses
  what it repeats of the stripped whitespace, and its usage keeps only its own output tokens (the caller
  has the input from the first `message_start`; the broken attempt's output is billed, never shown). Any
  400 is PREFILL_REFUSED: the broker goes on with replay and never shows that 400 to the caller.
- replay (Anthropic Messages, Chat Completions): the call is sent again unchanged; nothing is forwarded
  while its content (per block: text or tool input JSON; Chat: content and tool call arguments) stays a
  prefix of what was delivered (PROGRESS instead, so the broker's stale clock keeps time); the event that
  crosses the delivered length is cut to its new part; any difference is REPLAY_DIVERGED, at once.
Never continued (NOT_CONTINUABLE): thinking (its signatures cannot be rebuilt), n > 1, logprobs, the
Responses API, a call that is not a stream. Tool use is never prefilled (partial JSON is not text); it
may be replayed. The continuation runs under the same stream hygiene: ending without its terminal event
it is incomplete, never a success.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from broker.eventstream import CONTENT_TYPE as EVENT_STREAM
from broker.protocol import CONTINUED_HEADER, Call, Continuation, ErrorInfo, HttpCall, Response, Resume

from .exchange import _ENDPOINTS
from .hygiene import ANTHROPIC_MESSAGES, StreamIncomplete

_CALL = msgspec.msgpack.Decoder(Call | HttpCall)
_BATCH = msgspec.msgpack.Decoder(list[tuple[str, bytes]])
_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder()
_CONTENT = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}

Run = Callable[[Call | HttpCall, Any], Awaitable[None]]  # runs a call with an emitter (the worker's own path)


class ContinuationError(Exception):
    code = Continuation.NOT_CONTINUABLE


class PrefillRefused(ContinuationError):
    code = Continuation.PREFILL_REFUSED


class Diverged(ContinuationError):
    code = Continuation.REPLAY_DIVERGED


async def run_resume(resume: Resume, kind: str, run: Run, emit: Any) -> None:
    """Continue `resume` with the first of its strategies that fits what was delivered."""
    try:
        call = _CALL.decode(resume.call)
        api, args = _api(kind, call)
        delivered = [event for raw in resume.delivered for event in _BATCH.decode(raw)]
        seen = Seen(api, delivered)
        _check(api, args, seen)
        why = seen.unprefillable() or _own_prefill(args)
        if "prefill" in resume.strategies and api == "anthropic" and why is None:
            await _prefill(call, args, seen, run, emit)
        elif "replay" in resume.strategies:
            await run(call, Spliced(emit, Replay(seen), "replay"))
        else:
            raise ContinuationError(
                f"not continuable by prefill ({why or 'Anthropic Messages only'}) and replay is off"
            )
    except ContinuationError as exc:
        await emit.error(ErrorInfo(exc.code, str(exc), error_type=type(exc).__name__))


def _api(kind: str, call: Call | HttpCall) -> tuple[str, dict[str, Any]]:
    """("anthropic" or "chat", the call's arguments), or NotContinuable."""
    if isinstance(call, Call):
        # The SDK merges `extra_body` into the JSON it sends: what an SDK release lacks a parameter for
        # (anthropic < 0.47 has no `thinking=`) comes that way, and is part of the call all the same.
        extra = call.kwargs.get("extra_body")
        method, args = call.method, {**call.kwargs, **(extra if isinstance(extra, dict) else {})}
    else:
        method = _ENDPOINTS.get((kind, call.path.split("?", 1)[0])) if call.method == "POST" else None
        try:
            args = _DEC.decode(call.body) if method else {}
        except msgspec.DecodeError:
            args = {}
    if kind == "anthropic" and method in ANTHROPIC_MESSAGES:
        return "anthropic", args
    if kind == "openai" and method == "chat.completions.create":
        return "chat", args
    raise ContinuationError(f"not continuable: {method or 'this endpoint'} (only Messages and Chat Completions)")


def _check(api: str, args: dict[str, Any], seen: Seen) -> None:
    if not args.get("stream"):
        raise ContinuationError("not continuable: not a stream")
    if api == "anthropic" and ((args.get("thinking") or {}).get("type", "disabled") != "disabled" or seen.thinking):
        raise ContinuationError("not continuable: extended thinking (its blocks' signatures cannot be rebuilt)")
    if api == "chat" and ((args.get("n") or 1) > 1 or args.get("logprobs")):
        raise ContinuationError("not continuable: n > 1 or logprobs")


def _own_prefill(args: dict[str, Any]) -> str | None:
    """Why a call cannot be prefilled for its own sake: its conversation already ends with an assistant turn."""
    messages = args.get("messages") or [{}]
    return "the call has a prefill of its own" if messages[-1].get("role") == "assistant" else None


class Seen:
    """What the caller received: per content key its text (Anthropic: block index; Chat: "content",
    "refusal", ("name", k), ("args", k)), which blocks started and closed, and the structure around them."""

    def __init__(self, api: str, events: list[tuple[str, bytes]]) -> None:
        self.api = api
        self.content: dict[Any, str] = {}
        self.blocks: dict[int, dict[str, Any]] = {}  # Anthropic: index -> content_block as started
        self.closed: set[int] = set()
        self.kinds: set[str] = set()  # Anthropic event types; Chat: "role", "finish", ("tool", k)
        self.chunk: dict[str, Any] = {}  # Chat: the first chunk's id and created, which every later one repeats
        self.thinking = False
        for _, data in events:
            (self._anthropic if api == "anthropic" else self._chat)(_DEC.decode(data))

    def _anthropic(self, event: dict[str, Any]) -> None:
        kind = event.get("type", "")
        self.kinds.add(kind)
        if kind == "content_block_start":
            block = event["content_block"]
            self.blocks[event["index"]] = block
            self.content[event["index"]] = block.get("text", "") if block.get("type") == "text" else ""
            self.thinking = self.thinking or "thinking" in block.get("type", "")
        elif kind == "content_block_delta" and (key := _CONTENT.get(event["delta"].get("type", ""))):
            self.content[event["index"]] = self.content.get(event["index"], "") + event["delta"][key]
        elif kind == "content_block_stop":
            self.closed.add(event["index"])

    def _chat(self, chunk: dict[str, Any]) -> None:
        self.chunk = self.chunk or {k: chunk[k] for k in ("id", "created") if k in chunk}
        for choice in chunk.get("choices") or ():
            for key, value in _chat_parts(choice.get("delta") or {}):
                self.content[key] = self.content.get(key, "") + value
            if "role" in (choice.get("delta") or {}):
                self.kinds.add("role")
            for call in (choice.get("delta") or {}).get("tool_calls") or ():
                self.kinds.add(("tool", call["index"]))  # type: ignore[arg-type]
            if choice.get("finish_reason") is not None:
                self.kinds.add("finish")

    def unprefillable(self) -> str | None:
        """Why the delivered blocks cannot be continued by prefill, or None."""
        if any(block.get("type") != "text" for block in self.blocks.values()):
            return "a block that is not text (tool use is never prefilled)"
        if self.blocks and max(self.blocks) in self.closed:
            return "its last block was closed"
        if "message_delta" in self.kinds:
            return "the answer had ended"
        return None


def _chat_parts(delta: dict[str, Any]) -> list[tuple[Any, str]]:
    """The content a Chat Completions delta adds, by key."""
    parts: list[tuple[Any, str]] = [(k, delta[k]) for k in ("content", "refusal") if isinstance(delta.get(k), str)]
    for call in delta.get("tool_calls") or ():
        fn = call.get("function") or {}
        parts += [((f, call["index"]), fn[f]) for f in ("name", "arguments") if isinstance(fn.get(f), str)]
    return parts


class Ledger:
    """The replay's content against the delivered content, key by key (each char compared once)."""

    def __init__(self, want: dict[Any, str]) -> None:
        self.want, self.got = want, dict.fromkeys(want, 0)  # key -> chars replayed so far

    def take(self, key: Any, piece: str) -> str:
        """Add `piece` to `key`'s replayed content: the part of it beyond what was delivered; Diverged if
        the two differ (the message says where, not what: the content stays out of logs)."""
        start = self.got.get(key, 0)
        want = self.want.get(key, "")
        overlap = want[start : start + len(piece)]
        if piece[: len(overlap)] != overlap:
            at = start + next(i for i, (a, b) in enumerate(zip(piece, overlap, strict=False)) if a != b)
            raise Diverged(f"replay diverged at char {at} of {_name(key)}")
        self.got[key] = start + len(piece)
        return piece[len(overlap) :]

    def short(self) -> list[Any]:
        """The keys whose delivered content the replay has not reproduced yet."""
        return [k for k, want in self.want.items() if self.got.get(k, 0) < len(want)]

    def caught_up(self, what: str) -> None:
        if short := self.short():
            raise Diverged(f"replay diverged: {what} before it reproduced {', '.join(map(_name, short))}")


def _name(key: Any) -> str:
    if isinstance(key, int):
        return f"block {key}"
    return f"tool call {key[1]}'s {key[0]}" if isinstance(key, tuple) else str(key)


class Spliced:
    """The emitter a continuation runs with: each batch rewritten by `splice` (PROGRESS for a batch
    left empty), its HEAD naming the strategy for the broker."""

    def __init__(self, emit: Any, splice: Any, strategy: str) -> None:
        self._emit, self._splice, self.strategy = emit, splice, strategy

    async def head(self, response: Response) -> None:
        kind = next((v for k, v in response.headers if k.lower() == "content-type"), "")
        if not kind.startswith(("text/event-stream", EVENT_STREAM)):  # a body where events were due: never a success
            raise StreamIncomplete("the provider answered the continuation without a stream")
        headers = [*response.headers, (CONTINUED_HEADER, self.strategy)]
        await self._emit.head(msgspec.structs.replace(response, headers=headers))

    async def events(self, batch: list[tuple[str, bytes]]) -> None:
        out = [event for name, data in batch if (event := self._splice.rewrite(name, data)) is not None]
        await (self._emit.events(out) if out else self._emit.progress())

    async def error_event(self, event: tuple[str, bytes]) -> None:
        await self._emit.error_event(event)

    async def progress(self) -> None:
        await self._emit.progress()

    async def ending(self) -> None:
        await self._emit.ending()

    async def usage(self, facts: Any) -> None:  # the provider's own report of the continuation: what it billed
        await self._emit.usage(facts)

    async def result(self, response: Response | None) -> None:
        await self._emit.result(response)

    async def error(self, info: ErrorInfo) -> None:
        await self._emit.error(info)


def _with(data: dict[str, Any], name: str) -> tuple[str, bytes]:
    return name, _ENC.encode(data)


class Replay:
    """Rewrites a replayed stream: nothing until it has reproduced what was delivered, then the rest."""

    def __init__(self, seen: Seen) -> None:
        self.seen, self.ledger = seen, Ledger(seen.content)

    def rewrite(self, name: str, data: bytes) -> tuple[str, bytes] | None:
        event = _DEC.decode(data)
        if self.seen.api == "chat":
            return self._chat(name, event, data)
        kind, seen = event.get("type", name), self.seen
        if kind == "message_start" and kind in seen.kinds:
            return None
        if kind == "content_block_start":
            index, block = event["index"], event["content_block"]
            if index not in seen.blocks:
                self.ledger.caught_up(f"block {index} started")
                return name, data
            was = seen.blocks[index]
            if (block.get("type"), block.get("name")) != (was.get("type"), was.get("name")):
                raise Diverged(f"replay diverged: block {index} is {block.get('type')}, the caller's {was.get('type')}")
            return None
        if kind == "content_block_delta" and (key := _CONTENT.get(event["delta"].get("type", ""))):
            index, piece = event["index"], event["delta"][key]
            new = self.ledger.take(index, piece)
            if new and index in seen.closed:
                raise Diverged(f"replay diverged: block {index} goes on where the caller's had ended")
            if not new:
                return None
            return (name, data) if new == piece else _with({**event, "delta": {**event["delta"], key: new}}, name)
        if kind == "content_block_delta":  # a signature or citation: kept with its block's content
            return None if event["index"] in seen.closed else (name, data)
        if kind == "content_block_stop":
            index = event["index"]
            if index in seen.blocks and index in self.ledger.short():
                raise Diverged(f"replay diverged: block {index} ended shorter than the caller's")
            return None if index in seen.closed else (name, data)
        if kind in ("message_delta", "message_stop"):
            self.ledger.caught_up(f"the answer ended ({kind})")
            return None if kind in seen.kinds else (name, data)
        return name, data

    def _chat(self, name: str, chunk: dict[str, Any], data: bytes) -> tuple[str, bytes] | None:
        choices = chunk.get("choices")
        if not choices:  # the usage chunk, an error
            return name, _ENC.encode({**chunk, **self.seen.chunk}) if "choices" in chunk else data
        choice = choices[0]
        delta = {}
        for key, value in (choice.get("delta") or {}).items():
            if key == "role" and "role" in self.seen.kinds:
                continue
            if key in ("content", "refusal") and isinstance(value, str):
                if new := self.ledger.take(key, value):
                    delta[key] = new
            elif key == "tool_calls":
                if calls := [c for call in value or () if (c := self._tool_call(call))]:
                    delta[key] = calls
            elif value is not None:
                delta[key] = value
        if choice.get("finish_reason") is not None:
            self.ledger.caught_up("the answer finished")
        elif not delta:
            return None
        return name, _ENC.encode({**chunk, **self.seen.chunk, "choices": [{**choice, "delta": delta}]})

    def _tool_call(self, call: dict[str, Any]) -> dict[str, Any] | None:
        """A tool call's delta, less what the caller has of it (None if nothing is left)."""
        index, fn = call["index"], call.get("function") or {}
        if ("tool", index) not in self.seen.kinds:
            if self.ledger.short():
                self.ledger.caught_up(f"tool call {index} started")
            return call
        parts = {f: self.ledger.take((f, index), fn[f]) for f in ("name", "arguments") if isinstance(fn.get(f), str)}
        parts = {f: new for f, new in parts.items() if new}
        return {"index": index, "function": parts} if parts else None


class Prefill:
    """Rewrites the stream of a prefilled continuation into the rest of the caller's message."""

    def __init__(self, seen: Seen, whitespace: str) -> None:
        self.open = max(seen.blocks) if seen.blocks else None  # the caller's open text block, continued
        self.whitespace = whitespace  # what the prefill left off, which the continuation may repeat
        self.offset = 0 if self.open is None else self.open

    def rewrite(self, name: str, data: bytes) -> tuple[str, bytes] | None:
        event = original = _DEC.decode(data)
        kind = event.get("type", name)
        if kind == "message_start":
            return None
        if kind == "content_block_start" and event["index"] == 0 and self.open is not None:
            if event["content_block"].get("type") == "text":
                return None
            self.offset = self.open + 1  # not text after all: a block of its own after the caller's
        if kind == "content_block_delta" and event["index"] == 0 and self.whitespace:
            text = event["delta"].get("text", "")
            if not text:
                return None
            common = next((i for i, (a, b) in enumerate(zip(text, self.whitespace, strict=False)) if a != b),
                          min(len(text), len(self.whitespace)))  # fmt: skip
            self.whitespace = self.whitespace[common:] if common == len(text) else ""
            if common == len(text):
                return None
            event = {**event, "delta": {**event["delta"], "text": text[common:]}}
        if kind == "message_delta":  # the caller has the input tokens (and cache counts) from its message_start
            event = {**event, "usage": {"output_tokens": (event.get("usage") or {}).get("output_tokens")}}
        if "index" in event and self.offset:
            event = {**event, "index": event["index"] + self.offset}
        return (name, data) if event is original else _with(event, name)

    @staticmethod
    def text(seen: Seen) -> str:
        return "".join(seen.content[i] for i in sorted(seen.blocks))


async def _prefill(call: Call | HttpCall, args: dict[str, Any], seen: Seen, run: Run, emit: Any) -> None:
    """Send the delivered text as an assistant prefill and splice the continuation on; a 400 is
    PREFILL_REFUSED (the broker replays)."""
    text = Prefill.text(seen)
    prefill = text.rstrip()
    continued = call
    if prefill:
        messages = [*args.get("messages", ()), {"role": "assistant", "content": prefill}]
        if isinstance(call, Call):
            continued = Call(call.method, {**call.kwargs, "messages": messages})
        else:
            continued = msgspec.structs.replace(call, body=_ENC.encode({**args, "messages": messages}))
    try:
        await run(continued, Spliced(emit, Prefill(seen, text[len(prefill) :]), "prefill"))
    except Exception as exc:
        if prefill and 400 in (getattr(exc, "status_code", None), getattr(exc, "status", None)):
            raise PrefillRefused(f"the provider refused the prefill: {str(exc)[:300]}") from None
        raise
