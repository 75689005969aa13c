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
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": out},
        }

    @classmethod
    def final(cls, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        stop = "max_tokens" if reply.stopped_by_limit else "end_turn"
        return cls._message(reply, [{"type": "text", "text": reply.text}], stop, reply.output_tokens)

    @classmethod
    def events(cls, reply: Reply, body: dict[str, Any]) -> list[SseEvent]:
        stop = "max_tokens" if reply.stopped_by_limit else "end_turn"
        events: list[SseEvent] = [
            ("message_start", {"type": "message_start", "message": cls._message(reply, [], None, 1)}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            cls.ping,
        ]
        events += [
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
            )
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


class OpenAIChat:
    ping: SseEvent | None = None  # OpenAI keeps streams alive with SSE comments only

    @staticmethod
    def _usage(reply: Reply) -> dict[str, int]:
        total = reply.input_tokens + reply.output_tokens
        return {"prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens, "total_tokens": total}

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
                    "message": {"role": "assistant", "content": reply.text, "refusal": None},
                    "finish_reason": "length" if reply.stopped_by_limit else "stop",
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
        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": piece}) for piece in reply.pieces]
        events.append(chunk({}, "length" if reply.stopped_by_limit else "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append((None, {**head, "choices": [], "usage": cls._usage(reply)}))
        events.append((None, "[DONE]"))
        return events

    @staticmethod
    def error_event(kind: str, message: str) -> SseEvent:
        return (None, {"error": {"type": kind, "message": message, "code": kind}})


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
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": reply.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": reply.input_tokens + reply.output_tokens,
            }
            if usage
            else None,
        }

    @staticmethod
    def _item(reply: Reply, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"type": "message", "id": reply.ident("msg_"), "status": status, "role": "assistant", "content": content}

    @classmethod
    def final(cls, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        return cls._response(reply, "completed", [cls._item(reply, reply.text, "completed")], True)

    @classmethod
    def events(cls, reply: Reply, body: dict[str, Any]) -> list[SseEvent]:
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

    @staticmethod
    def error_event(kind: str, message: str) -> SseEvent:
        return ("error", {"type": "error", "code": kind, "message": message, "param": None, "sequence_number": 0})
