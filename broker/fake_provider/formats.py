"""The three wire formats the fake provider speaks, as the real APIs shape them.

Each format turns a `Reply` into the non-streaming JSON body and into the list of
SSE events `(event name or None, data)` that the streaming API sends.
"""

from __future__ import annotations

from typing import Any

from .content import FIXED_CREATED, Reply

SseEvent = tuple[str | None, Any]


class AnthropicMessages:
    ping: SseEvent = ("ping", {"type": "ping"})

    @staticmethod
    def _message(reply: Reply, content: list[dict[str, Any]], stop: str | None, out: int) -> dict[str, Any]:
        return {
            "id": reply.ident("msg_"),
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                # Anthropic counts apart what was read from the cache and what was written to it
                "input_tokens": reply.input_tokens - reply.cached_tokens - reply.cache_writes,
                "cache_creation_input_tokens": reply.cache_writes,
                "cache_read_input_tokens": reply.cached_tokens,
                "output_tokens": out,
            },
        }

    @staticmethod
    def _stop(reply: Reply) -> str:
        if reply.refused:
            return "refusal"
        return "tool_use" if reply.tool else "max_tokens" if reply.stopped_by_limit else "end_turn"

    @staticmethod
    def _block(reply: Reply, done: bool) -> dict[str, Any]:
        if reply.tool:
            input_ = reply.tool_input if done else {}
            return {"type": "tool_use", "id": reply.ident("toolu_"), "name": reply.tool[0], "input": input_}
        return {"type": "text", "text": reply.text if done else ""}

    @classmethod
    def final(cls, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        return cls._message(reply, [cls._block(reply, True)], cls._stop(reply), reply.output_tokens)

    @classmethod
    def events(cls, reply: Reply, body: dict[str, Any]) -> list[SseEvent]:
        stop = cls._stop(reply)
        events: list[SseEvent] = [
            ("message_start", {"type": "message_start", "message": cls._message(reply, [], None, 1)}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": cls._block(reply, False)},
            ),
            cls.ping,
        ]
        delta = {"type": "input_json_delta", "partial_json": ""} if reply.tool else {"type": "text_delta", "text": ""}
        key = "partial_json" if reply.tool else "text"
        events += [
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {**delta, key: piece}})
            for piece in reply.pieces
        ]
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": reply.output_tokens},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return events

    @staticmethod
    def error_event(kind: str, message: str) -> SseEvent:
        return ("error", {"type": "error", "error": {"type": kind, "message": message}})

    @staticmethod
    def ending(events: list[SseEvent]) -> int:
        """Where the events that end the answer begin: its `message_delta` (stop reason, usage)."""
        return next(i for i, (name, _) in enumerate(events) if name == "message_delta")


class OpenAIChat:
    ping: SseEvent | None = None  # OpenAI keeps streams alive with SSE comments only

    @staticmethod
    def _usage(reply: Reply) -> dict[str, int]:
        total = reply.input_tokens + reply.output_tokens
        return {"prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens, "total_tokens": total,
                "prompt_tokens_details": {"cached_tokens": reply.cached_tokens}}  # fmt: skip

    @staticmethod
    def _finish(reply: Reply) -> str:
        return "tool_calls" if reply.tool else "length" if reply.stopped_by_limit else "stop"

    @staticmethod
    def _message(reply: Reply) -> dict[str, Any]:
        if not reply.tool:
            return {"role": "assistant", "content": reply.text, "refusal": None}
        function = {"name": reply.tool[0], "arguments": reply.text}
        call = {"id": reply.ident("call_"), "type": "function", "function": function}
        return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}

    @classmethod
    def final(cls, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": reply.ident("chatcmpl-"),
            "object": "chat.completion",
            "created": FIXED_CREATED,
            "model": reply.model,
            "choices": [
                {
                    "index": 0,
                    "message": cls._message(reply),
                    "finish_reason": cls._finish(reply),
                    "logprobs": None,
                }
            ],
            "usage": cls._usage(reply),
        }

    @classmethod
    def events(cls, reply: Reply, body: dict[str, Any]) -> list[SseEvent]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> SseEvent:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return (None, {**head, "choices": [choice]})

        head = {
            "id": reply.ident("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": FIXED_CREATED,
            "model": reply.model,
        }
        if reply.tool:
            call = {"index": 0, "id": reply.ident("call_"), "type": "function"}
            events = [chunk({"role": "assistant", "content": None, "tool_calls": [
                {**call, "function": {"name": reply.tool[0], "arguments": ""}}]})]  # fmt: skip
            events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in reply.pieces]
        else:
            events = [chunk({"role": "assistant", "content": ""})]
            events += [chunk({"content": piece}) for piece in reply.pieces]
        events.append(chunk({}, cls._finish(reply)))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append((None, {**head, "choices": [], "usage": cls._usage(reply)}))
        events.append((None, "[DONE]"))
        return events

    @staticmethod
    def error_event(kind: str, message: str) -> SseEvent:
        return (None, {"error": {"type": kind, "message": message, "code": kind}})

    @staticmethod
    def ending(events: list[SseEvent]) -> int:
        """Where the events that end the answer begin: the chunk with its finish reason."""
        return next(i for i, (_, data) in enumerate(events) if isinstance(data, dict) and data.get("choices")
                    and data["choices"][0]["finish_reason"])  # fmt: skip


class OpenAIResponses:
    ping: SseEvent | None = None

    @staticmethod
    def _response(reply: Reply, status: str, output: list[dict[str, Any]], usage: bool) -> dict[str, Any]:
        return {
            "id": reply.ident("resp_"),
            "object": "response",
            "created_at": FIXED_CREATED,
            "status": status,
            "model": reply.model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": {},
            "temperature": 1.0,
            "top_p": 1.0,
            "usage": {
                "input_tokens": reply.input_tokens,
                "input_tokens_details": {"cached_tokens": reply.cached_tokens},
                "output_tokens": reply.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": reply.input_tokens + reply.output_tokens,
            }
            if usage
            else None,
        }

    @staticmethod
    def _item(reply: Reply, text: str, status: str) -> dict[str, Any]:
        if reply.tool:
            return {"type": "function_call", "id": reply.ident("fc_"), "call_id": reply.ident("call_"),
                    "name": reply.tool[0], "arguments": text, "status": status}  # fmt: skip
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"type": "message", "id": reply.ident("msg_"), "status": status, "role": "assistant", "content": content}

    @classmethod
    def final(cls, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        return cls._response(reply, "completed", [cls._item(reply, reply.text, "completed")], True)

    @classmethod
    def events(cls, reply: Reply, body: dict[str, Any]) -> list[SseEvent]:
        if reply.tool:
            return cls._tool_events(reply, body)
        item_id = reply.ident("msg_")
        part = {"type": "output_text", "text": "", "annotations": []}
        raw: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": cls._response(reply, "in_progress", [], False)}),
            ("response.in_progress", {"response": cls._response(reply, "in_progress", [], False)}),
            ("response.output_item.added", {"output_index": 0, "item": cls._item(reply, "", "in_progress")}),
            ("response.content_part.added", {"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
        ]
        place = {"item_id": item_id, "output_index": 0, "content_index": 0}
        raw += [("response.output_text.delta", {**place, "delta": p, "logprobs": []}) for p in reply.pieces]
        done_part = {**part, "text": reply.text}
        raw += [
            ("response.output_text.done", {**place, "text": reply.text, "logprobs": []}),
            ("response.content_part.done", {**place, "part": done_part}),
            ("response.output_item.done", {"output_index": 0, "item": cls._item(reply, reply.text, "completed")}),
            ("response.completed", {"response": cls.final(reply, body)}),
        ]
        return [(name, {"type": name, "sequence_number": i, **data}) for i, (name, data) in enumerate(raw)]

    @classmethod
    def _tool_events(cls, reply: Reply, body: dict[str, Any]) -> list[SseEvent]:
        place = {"item_id": reply.ident("fc_"), "output_index": 0}
        raw: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": cls._response(reply, "in_progress", [], False)}),
            ("response.in_progress", {"response": cls._response(reply, "in_progress", [], False)}),
            ("response.output_item.added", {"output_index": 0, "item": cls._item(reply, "", "in_progress")}),
        ]
        raw += [("response.function_call_arguments.delta", {**place, "delta": p}) for p in reply.pieces]
        raw += [
            ("response.function_call_arguments.done", {**place, "arguments": reply.text}),
            ("response.output_item.done", {"output_index": 0, "item": cls._item(reply, reply.text, "completed")}),
            ("response.completed", {"response": cls.final(reply, body)}),
        ]
        return [(name, {"type": name, "sequence_number": i, **data}) for i, (name, data) in enumerate(raw)]

    @staticmethod
    def error_event(kind: str, message: str) -> SseEvent:
        return ("error", {"type": "error", "code": kind, "message": message, "param": None, "sequence_number": 0})

    @staticmethod
    def ending(events: list[SseEvent]) -> int:
        """Where the events that end the answer begin: its `response.completed`."""
        return next(i for i, (name, _) in enumerate(events) if name == "response.completed")
