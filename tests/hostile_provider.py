"""A provider whose answers a test scripts (Anthropic Messages SSE), on a thread of the test: for what the fake
provider would never send (absurd usage, usage in every chunk)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Script = Callable[[dict[str, Any]], Iterator[bytes | float]]  # chunks to write; a float: sleep that long


def sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def answer(
    usage_start: dict[str, Any],
    usage_end: dict[str, Any],
    *,
    ident: str = "msg_1",
    model: str = "claude-fake",
    text: str = "hi",
) -> list[bytes]:
    """A whole Anthropic stream whose message_start and message_delta report the given usage."""
    return [
        sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": ident,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "usage": usage_start,
                },
            },
        ),
        sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        ),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage_end}),
        sse("message_stop", {"type": "message_stop"}),
    ]


class Hostile:
    """`script(body)` says what each POST /v1/messages streams back."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.seen: list[dict[str, Any]] = []  # each request: its headers and body
        self.stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                outer.seen.append({"headers": dict(self.headers), "body": body})
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                try:
                    for piece in outer.script(body):
                        if isinstance(piece, float):
                            if outer.stopping.wait(piece):
                                return
                        else:
                            self.wfile.write(piece)
                            self.wfile.flush()
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hostile:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
