"""A header value outside ASCII goes upstream as the caller's own SDK would send it.

The Anthropic SDK sends `default_headers={"x-note": "café"}` as UTF-8 bytes; through the shim the same call
failed with the pool's internal error (the worker built the request with an ASCII-only header encoding), seen
by the caller as `APIConnectionError`. The OpenAI SDK refuses such a value itself, before anything is sent,
and does so through the shim too. The gateway relays a UTF-8 value as it came and refuses one that is not
UTF-8 (no SDK sends one) with a 400 in the SDK's error form, never an internal error.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from broker import BadRequest, Pool
from broker import shim as isoshim
from broker.protocol import HttpCall

from .conftest import TEST_SETTINGS

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

NOTE = "café ✓ naïve"
TOKENS = {"model": "claude-fake", "messages": [{"role": "user", "content": "hi"}]}


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers any request with a small JSON body, recording the raw bytes of its `*note` headers."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, list[tuple[str, bytes]]]] = []

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        notes = [(k.lower(), v.encode("latin-1")) for k, v in self.headers.items() if k.lower().endswith("note")]
        self.seen.append((self.command, self.path, notes))
        body = json.dumps({"input_tokens": 3} if "count_tokens" in self.path else {
            "id": "gpt-fake", "object": "model", "created": 0, "owned_by": "test"}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def pool(upstream):
    profiles = {
        "anthropic": {"kind": "anthropic", "base_url": upstream, "min_workers": 1},
        "openai": {"kind": "openai", "base_url": upstream + "/v1", "min_workers": 1},
    }
    with Pool(profiles=profiles, **dict(TEST_SETTINGS, http="127.0.0.1:0")) as p:
        yield p


def recorded(run: Any) -> tuple[Any, list[Any]]:
    """What `run()` returned and the requests it sent upstream."""
    _Recorder.seen.clear()
    return run(), list(_Recorder.seen)


def anthropic_call(client: Any) -> Any:
    """count_tokens with a non-ASCII default header and a non-ASCII per-call one, run to its answer."""
    answer = client.messages.count_tokens(**TOKENS, extra_headers={"x-extra-note": NOTE[::-1]})
    return asyncio.run(answer).input_tokens if asyncio.iscoroutine(answer) else answer.input_tokens


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_the_anthropic_shim_sends_a_non_ascii_header_as_the_sdk_does(upstream, pool, flavour):
    direct = anthropic.Anthropic if flavour == "sync" else anthropic.AsyncAnthropic
    shimmed = isoshim.Anthropic if flavour == "sync" else isoshim.AsyncAnthropic
    headers = {"x-note": NOTE}
    want = recorded(lambda: anthropic_call(direct(base_url=upstream, api_key="k", default_headers=headers)))
    got = recorded(lambda: anthropic_call(shimmed(pool=pool, default_headers=headers)))
    assert want[1] == [("POST", "/v1/messages/count_tokens", [("x-note", NOTE.encode()),
                                                              ("x-extra-note", NOTE[::-1].encode())])]  # fmt: skip
    assert got == want


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_the_openai_shim_refuses_a_non_ascii_header_as_the_sdk_does(upstream, pool, flavour):
    direct = openai.OpenAI if flavour == "sync" else openai.AsyncOpenAI
    shimmed = isoshim.OpenAI if flavour == "sync" else isoshim.AsyncOpenAI

    def outcome(client: Any) -> tuple[str, str]:
        try:
            answer = client.models.retrieve("gpt-fake", extra_headers={"x-note": NOTE})
            return "answered", (asyncio.run(answer) if asyncio.iscoroutine(answer) else answer).id
        except Exception as exc:
            return type(exc).__name__, str(exc)

    want = recorded(lambda: outcome(direct(base_url=upstream + "/v1", api_key="k")))
    assert recorded(lambda: outcome(shimmed(pool=pool))) == want


def test_a_request_the_workers_sdk_client_builds_sends_a_non_ascii_header_as_utf8(pool):
    """A PUT is built by the worker's SDK client itself (not put together by the worker): UTF-8 too."""
    with pool.client() as client:
        call = HttpCall("PUT", "/v1/notes", [("content-type", "application/json"), ("x-note", NOTE)], b"{}")
        result, seen = recorded(lambda: client.submit_http("anthropic", call).result())
    assert result.status == 200
    assert seen == [("PUT", "/v1/notes", [("x-note", NOTE.encode())])]


@pytest.mark.parametrize("value", [b"caf\xc3\xa9", 7], ids=["bytes", "int"])
def test_a_header_value_of_another_type_than_str_is_the_callers_bad_request(pool, value):
    """The low-level client given a header value that is not a str: a BadRequest that says what an HttpCall
    holds (it was an InternalError, "[internal] ValidationError"), and the pool serves the next call."""
    with pool.client() as client:
        call = HttpCall("POST", "/v1/messages/count_tokens", [("x-note", value)], json.dumps(TOKENS).encode())
        with pytest.raises(BadRequest, match="header names and values are str"):
            client.submit_http("anthropic", call).result()
        good = HttpCall("POST", "/v1/messages/count_tokens", [], json.dumps(TOKENS).encode())
        assert client.submit_http("anthropic", good).result().status == 200


def raw_request(url: str, header: bytes) -> tuple[int, bytes]:
    """POST count_tokens to the gateway with this header line (its exact bytes): (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(TOKENS).encode()
    head = (
        f"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: {host}:{port}\r\nanthropic-version: 2023-06-01\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head + header + b"\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_the_gateway_relays_a_utf8_header_value_as_it_came(pool):
    (status, body), seen = recorded(lambda: raw_request(pool.http_url, b"anthropic-note: " + NOTE.encode()))
    assert (status, json.loads(body)) == (200, {"input_tokens": 3})
    assert seen == [("POST", "/v1/messages/count_tokens", [("anthropic-note", NOTE.encode())])]


@pytest.mark.parametrize("name", ["anthropic-note", "x-isopool-profile", "x-isopool-fallbacks"])
def test_the_gateway_refuses_a_header_value_that_is_not_utf8_in_the_sdks_error_form(pool, name):
    """A header that goes on, or one the gateway reads itself (its profile, its fallbacks)."""
    (status, body), seen = recorded(lambda: raw_request(pool.http_url, f"{name}: café".encode("latin-1")))
    assert status == 400 and seen == []
    error = json.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert name in error["error"]["message"] and "UTF-8" in error["error"]["message"]
