"""An upstream written apart from the fake provider: a plain aiohttp server that answers
Anthropic's `/v1/messages` (and `count_tokens`) and OpenAI's `/v1/chat/completions` with
`max_tokens` one-word deltas, each SSE event in its own write, as real servers write tokens.

A figure tuned on our own fake can collapse elsewhere; this one shares none of its code.
Run by path, not as a module (the bench package is not installed): `python -P plainsse.py`;
it prints its URL on stdout and exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

HEAD = {"content-type": "text/event-stream", "cache-control": "no-cache"}


def _length(body: dict) -> int:
    return int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)


def _usage(n: int) -> dict:
    return {"input_tokens": 5, "output_tokens": n, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def _anthropic_events(model: str, n: int) -> list[bytes]:
    message = {"id": "msg_plain", "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": _usage(1)}  # fmt: skip
    events = [("message_start", {"type": "message_start", "message": message}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]  # fmt: skip
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ""}}
    events += [("content_block_delta", {**delta, "delta": {"type": "text_delta", "text": f"w{i} "}}) for i in range(n)]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens",
                                  "stop_sequence": None}, "usage": {"output_tokens": n}}),
               ("message_stop", {"type": "message_stop"})]  # fmt: skip
    return [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]


def _chat_events(model: str, n: int, usage: bool) -> list[bytes]:
    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": "chatcmpl-plain", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}  # fmt: skip

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": f"w{i} "}) for i in range(n)]
    chunks.append(chunk({}, "length"))
    if usage:
        chunks.append({**chunk({}), "choices": [],
                       "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}})  # fmt: skip
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


async def _stream(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers=HEAD)
    await response.prepare(request)
    for event in events:
        await response.write(event)  # one write per event
    await response.write_eof()
    return response


async def messages(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    n, model = _length(body), body.get("model", "")
    if body.get("stream"):
        return await _stream(request, _anthropic_events(model, n))
    text = "".join(f"w{i} " for i in range(n))
    return web.json_response({"id": "msg_plain", "type": "message", "role": "assistant", "model": model,
                              "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens",
                              "stop_sequence": None, "usage": _usage(n)})  # fmt: skip


async def count_tokens(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"input_tokens": 5})


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    n, model = _length(body), body.get("model", "")
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await _stream(request, _chat_events(model, n, usage))
    message = {"role": "assistant", "content": "".join(f"w{i} " for i in range(n)), "refusal": None}
    return web.json_response({"id": "chatcmpl-plain", "object": "chat.completion", "created": 1700000000,
                              "model": model, "choices": [{"index": 0, "message": message, "finish_reason": "length",
                              "logprobs": None}], "usage": {"prompt_tokens": 5, "completion_tokens": n,
                              "total_tokens": 5 + n}})  # fmt: skip


async def serve() -> None:
    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    closed = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), lambda: sys.stdin.buffer.read1(4096) or closed.set())
    await closed.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve())
