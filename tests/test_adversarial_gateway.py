"""The HTTP gateway against hostile or careless callers (issue 15, items 6, 10 and 11).

Each test sends what a web page, a DNS-rebinding attacker, a slowloris or a broken client
would send, over a raw socket or `http.client`, to the real gateway of a real pool in front
of the fake provider (and, for what reaches an upstream, a real echoing HTTP server).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import pytest

from broker import Pool

from .conftest import TEST_SETTINGS, anthropic_args, http_chunks, profiles, wait_for

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

MAX = 256 * 1024  # the pool's max_message_bytes here: small, so that twice as much is quick to send
ORIGIN = "http://app.example:3000"
MSG = anthropic_args("through the gateway")
BODY = json.dumps({"model": "claude-fake", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()


class _Echo(BaseHTTPRequestHandler):
    """An upstream that answers every request with the path and the headers it received."""

    def _echo(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _echo

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def gateway(fake, echo):
    settings = dict(
        TEST_SETTINGS,
        http="127.0.0.1:0",
        max_message_bytes=MAX,
        gateway_read_timeout=1.0,
        gateway_origins=ORIGIN,
    )
    upstreams = profiles(fake.url, min_workers=1, spare_workers=0)
    upstreams["echo"] = {"kind": "openai", "base_url": echo + "/v1", "min_workers": 0, "spare_workers": 0}
    with Pool(profiles=upstreams, **settings) as pool:
        yield pool


def _port(pool: Pool) -> int:
    return int(pool.http_url.rsplit(":", 1)[1])


def send(pool: Pool, method: str, path: str, body=b"", **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (`Host` included when given); (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", _port(pool), timeout=15)
    try:
        headers = {k.replace("_", "-"): v for k, v in headers.items()}
        headers.setdefault("Host", f"127.0.0.1:{_port(pool)}")
        chunked = not isinstance(body, bytes)
        conn.request(method, path, body=body, headers=headers, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw_post(extra: str = "") -> bytes:
    """The head of a POST of BODY to /v1/messages, for a raw socket."""
    return (
        "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(BODY)}\r\n\r\n"
    ).encode()


def error_of(body: bytes) -> dict:
    """The `error` object of an Anthropic- or OpenAI-shaped error body."""
    return json.loads(body)["error"]


def accepted(pool: Pool) -> int:
    with pool.client() as client:
        return client.stats()["requests"].get("accepted", 0)


@pytest.mark.parametrize(
    ("path", "headers", "kind"),
    [
        ("/chat/completions", {}, "invalid_request_error"),
        ("/messages", {"anthropic_version": "2023-06-01"}, "not_found_error"),
    ],
)
def test_a_path_outside_the_apis_is_a_404_in_the_sdks_error_form_saying_what_is_served(gateway, path, headers, kind):
    """A base_url missing its `/v1` (the OpenAI SDK's) gets an error its SDK reads, naming the paths served."""
    status, _, body = send(gateway, "POST", path, BODY, content_type="application/json", **headers)
    assert status == 404 and error_of(body)["type"] == kind
    assert "/v1/" in error_of(body)["message"] and path in error_of(body)["message"]


def test_body_over_max_message_bytes_is_413_and_never_reaches_the_pool(gateway):
    before = accepted(gateway)
    big = b'{"model": "claude-fake", "pad": "' + b"x" * (2 * MAX) + b'"}'
    status, _, body = send(gateway, "POST", "/v1/messages", big, content_type="application/json")
    assert status == 413, body
    assert error_of(body)["type"] == "request_too_large" and "max_message_bytes" in error_of(body)["message"]
    pieces = iter([big[:1000], big[1000:]])  # chunked: no Content-Length to refuse it by
    status, _, body = send(gateway, "POST", "/v1/chat/completions", pieces, content_type="application/json")
    assert status == 413 and error_of(body)["type"] == "invalid_request_error", body
    assert accepted(gateway) == before
    with anthropic.Anthropic(base_url=gateway.http_url) as client:  # the gateway's pool connection is intact
        assert client.messages.create(**MSG).type == "message"


def test_invalid_json_is_400_and_never_reaches_the_pool(gateway):
    before = accepted(gateway)
    for path, text in (("/v1/messages", b'{"model": "claude-fake", '), ("/v1/chat/completions", b"[1, 2]")):
        status, _, body = send(gateway, "POST", path, text, content_type="application/json")
        assert status == 400, body
        assert error_of(body)["type"] == "invalid_request_error" and "JSON" in error_of(body)["message"]
    assert accepted(gateway) == before


def test_foreign_host_is_403_without_a_token(gateway):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: the Host header gives it away."""
    port = _port(gateway)
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        status, _, body = send(gateway, "GET", "/v1/models", Host=host)
        assert status == 403, (host, body)
        assert "gateway_token" in error_of(body)["message"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        status, _, body = send(gateway, "GET", "/v1/models", Host=host)
        assert status == 200, (host, body)


def test_browser_origin_is_403_unless_configured(gateway):
    evil = {"Origin": "https://evil.example", "Content-Type": "application/json"}
    status, _, body = send(gateway, "POST", "/v1/messages", BODY, **evil)
    assert status == 403 and "gateway_origins" in error_of(body)["message"], body
    status, _, body = send(gateway, "GET", "/v1/models", Origin="null")
    assert status == 403, body
    asks = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,x-api-key"}
    status, headers, _ = send(gateway, "OPTIONS", "/v1/messages", Origin=ORIGIN, **asks)
    assert status == 204 and headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in headers["access-control-allow-headers"]
    status, headers, body = send(gateway, "POST", "/v1/messages", BODY, content_type="application/json", Origin=ORIGIN)
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN, body


def test_token_from_a_file_or_generated_at_start_is_required(fake, tmp_path, capfd):
    token_file = tmp_path / "gateway.token"
    token_file.write_text("tok-from-file\n")
    generated = re.compile(r"gateway token: (\S+)")
    for source in ({"gateway_token_file": str(token_file)}, {"gateway_token": "auto"}):
        settings = dict(TEST_SETTINGS, http="127.0.0.1:0", **source)
        with Pool(profiles=profiles(fake.url, min_workers=1, spare_workers=0), **settings) as pool:
            token = "tok-from-file" if "gateway_token_file" in source else generated.search(capfd.readouterr().err)[1]
            status, _, body = send(pool, "GET", "/v1/models")
            assert status == 401 and "gateway token" in error_of(body)["message"], body
            status, _, _ = send(pool, "GET", "/v1/models", Host="my-laptop.lan:8787", Authorization=f"Bearer {token}")
            assert status == 200  # with its token the gateway may be reached under any name
            with anthropic.Anthropic(base_url=pool.http_url, api_key=token) as client:
                assert client.messages.create(**MSG).type == "message"


def test_a_caller_expecting_100_continue_is_told_to_send_its_body(gateway):
    """curl sends a larger body only once told to (or after a second's wait): the gateway tells it at once."""
    with socket.create_connection(("127.0.0.1", _port(gateway)), timeout=10) as sock:
        sock.sendall(raw_post("Expect: 100-continue\r\n"))
        assert sock.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(BODY)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_stalled_request_header_is_cut_off(gateway):
    with socket.create_connection(("127.0.0.1", _port(gateway)), timeout=10) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
        assert sock.recv(4096) == b""  # closed by the gateway (gateway_read_timeout = 1 s), not held


def test_stalled_request_body_is_408(gateway):
    with socket.create_connection(("127.0.0.1", _port(gateway)), timeout=10) as sock:
        sock.sendall(raw_post() + BODY[:10])
        reply = http.client.HTTPResponse(sock)
        reply.begin()  # answered (gateway_read_timeout = 1 s), not held
        assert reply.status == 408 and reply.getheader("connection") == "close"
        assert "gateway_read_timeout" in error_of(reply.read())["message"]


def test_caller_leaving_before_the_first_byte_cancels_its_call(fake, gateway):
    with gateway.client() as client:
        cancelled = client.stats()["requests"].get("cancelled", 0)
        disconnects = fake.stats()["disconnects"]
        with socket.create_connection(("127.0.0.1", _port(gateway)), timeout=15) as sock:
            sock.sendall(raw_post("x-isopool-latency: ttft=15\r\n") + BODY)
            wait_for(lambda: fake.stats()["active"], 10, "the provider to be working on the call")
        wait_for(lambda: client.stats()["requests"].get("cancelled", 0) > cancelled, 5, "the call to be cancelled")
        wait_for(lambda: fake.stats()["disconnects"] > disconnects, 5, "the provider to see the call dropped")


def test_only_allowlisted_headers_reach_the_provider(gateway):
    sent = {
        "anthropic-beta": "b1",
        "openai-organization": "org-1",
        "openai-project": "proj-1",
        "x-stainless-lang": "python",
        "user-agent": "tester/1",
        "cookie": "session=secret",
        "x-forwarded-host": "evil.example",
        "x-forwarded-for": "1.2.3.4",
        "forwarded": "host=evil.example",
        "te": "trailers",
        "keep-alive": "timeout=5",
        "proxy-connection": "keep-alive",
        "upgrade": "h2c",
        "x-custom-secret": "s3",
    }
    status, _, body = send(gateway, "GET", "/v1/models", x_isopool_profile="echo", **sent)
    assert status == 200, body
    received = json.loads(body)["headers"]
    for name in ("anthropic-beta", "openai-organization", "openai-project", "x-stainless-lang", "user-agent"):
        assert received.get(name) == sent[name], name
    leaked = {"cookie", "x-forwarded-host", "x-forwarded-for", "forwarded", "te", "keep-alive", "proxy-connection"}
    assert not (leaked | {"upgrade", "x-custom-secret", "x-isopool-profile"}) & set(received), received


def test_encoded_dot_segments_are_400(gateway):
    before = accepted(gateway)
    for path in ("/v1/%2e%2e/admin", "/v1/..%2fadmin", "/v1/%2E%2E%2Fadmin", "/v1/a%5c..%5cadmin", "/v1/a\\..\\admin",
                 "/v1/%252e%252e/admin", "/v1/x/../../admin", "/v1/./models"):  # fmt: skip
        status, _, body = send(gateway, "GET", path, x_isopool_profile="echo")
        assert status == 400, (path, body)
        assert error_of(body)["type"] == "invalid_request_error"
    assert accepted(gateway) == before


def test_serve_token_auto_prints_the_token_the_gateway_then_requires(fake, tmp_path):
    """`isopool serve --http … --token auto`: the token is made at start, printed once, and required."""
    config = tmp_path / "isopool.toml"
    config.write_text(f'[profiles.anthropic]\nkind = "anthropic"\nbase_url = "{fake.url}"\nmin_workers = 1\n')
    env = dict(os.environ, ISOPOOL_RUN_DIR=str(tmp_path / "run"))
    isopool = os.path.join(os.path.dirname(sys.executable), "isopool")
    proc = subprocess.Popen([isopool, "serve", "--config", str(config), "--http", "127.0.0.1:0", "--token", "auto"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        token = re.search(r"gateway token: (\S+)", proc.stderr.readline())[1]  # type: ignore[union-attr,index]
        banner = "".join(proc.stdout.readline() for _ in range(4))  # type: ignore[union-attr]
        url = re.search(r"base_url (http://\S+) \(Anthropic\)", banner)[1]  # type: ignore[index]
        with anthropic.Anthropic(base_url=url, api_key="not-the-token", max_retries=0) as client:
            with pytest.raises(anthropic.AuthenticationError, match="token"):
                client.messages.create(**MSG)
        with anthropic.Anthropic(base_url=url, api_key=token, max_retries=0) as client:
            assert client.messages.create(**MSG).type == "message"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def _stream_post(tokens: int, latency: str) -> bytes:
    """A raw streaming POST of `tokens` tokens, the fake paced by `latency`; the gateway closes after it."""
    body = json.dumps({"model": "claude-fake", "max_tokens": tokens, "stream": True,
                       "messages": [{"role": "user", "content": f"batched {tokens}"}]}).encode()  # fmt: skip
    head = (
        "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
        f"x-isopool-latency: tokens={tokens},{latency}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _text(sse: bytes) -> str:
    """The text of an Anthropic SSE stream's deltas."""
    events = [json.loads(line[6:]) for line in sse.split(b"\n") if line.startswith(b"data: ")]
    return "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")


def test_a_slow_reader_gets_a_long_stream_whole_in_large_batched_writes(fake, gateway):
    """Events that arrive together go out in one write: a caller that reads nothing for a while gets a
    long stream in far fewer chunks than events, every event whole and in order, then the end."""
    tokens = 3000
    with socket.create_connection(("127.0.0.1", _port(gateway)), timeout=30) as sock:
        sock.sendall(_stream_post(tokens, "gap=0"))
        sock.settimeout(30)
        first = sock.recv(65536)
        time.sleep(0.5)  # the stream's events pile up in the gateway meanwhile
        raw = first + b"".join(iter(lambda: sock.recv(1 << 20), b""))
    assert raw.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in raw.partition(b"\r\n\r\n")[0].lower()
    chunks = http_chunks(raw)
    stream = b"".join(chunks)
    names = [line for line in stream.split(b"\n") if line.startswith(b"event: ")]
    assert names[0] == b"event: message_start" and names[-1] == b"event: message_stop"
    assert len(names) > tokens and len(chunks) < len(names) / 10, (len(chunks), len(names))
    assert max(len(c) for c in chunks) > 16 * 1024  # one batch held a hundred events or more
    with anthropic.Anthropic(base_url=fake.url) as direct:
        args = dict(model="claude-fake", max_tokens=tokens, messages=[{"role": "user", "content": f"batched {tokens}"}])
        want = direct.messages.create(**args, extra_headers={"x-isopool-latency": f"tokens={tokens},gap=0"})
    assert _text(stream) == want.content[0].text


def test_caller_leaving_mid_stream_cancels_its_call(fake, gateway):
    """A caller that leaves after batches were written to it cancels its call, and the provider sees it go."""
    with gateway.client() as client:
        cancelled = client.stats()["requests"].get("cancelled", 0)
        disconnects = fake.stats()["disconnects"]
        with socket.create_connection(("127.0.0.1", _port(gateway)), timeout=15) as sock:
            sock.sendall(_stream_post(2000, "gap=0.005"))  # ten seconds of stream
            seen = b""
            while b"content_block_delta" not in seen:  # output written: the call is past its first event
                seen += sock.recv(65536)
        wait_for(lambda: client.stats()["requests"].get("cancelled", 0) > cancelled, 5, "the call to be cancelled")
        wait_for(lambda: fake.stats()["disconnects"] > disconnects, 5, "the provider to see the call dropped")


@pytest.fixture
def budget(fake) -> Iterator[Pool]:
    """A gateway whose bodies' budget (queue_bytes_limit) is four of its largest bodies."""
    settings = dict(TEST_SETTINGS, http="127.0.0.1:0", max_message_bytes=MAX, queue_bytes_limit=4 * MAX,
                    gateway_read_timeout=60.0)  # fmt: skip
    profile = {"anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 1, "spare_workers": 0}}
    with Pool(profiles=profile, **settings) as pool:
        yield pool


def _head(size: int, *extra: str) -> bytes:
    lines = ["POST /v1/messages HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *extra,
             f"Content-Length: {size}"]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(sock: socket.socket) -> tuple[int, dict]:
    reply = http.client.HTTPResponse(sock)
    reply.begin()
    return reply.status, error_of(reply.read()) if reply.status >= 400 else {}


def _whole(pool: Pool, size: int) -> tuple[int, dict]:
    """A body of `size` spaces: read whole, then refused as no JSON object (400), unless there is no room."""
    with socket.create_connection(("127.0.0.1", _port(pool)), timeout=15) as sock:
        sock.sendall(_head(size) + b" " * size)
        return _answer(sock)


def _ok(pool: Pool) -> bool:
    status, _, body = send(pool, "POST", "/v1/messages", BODY, content_type="application/json")
    return status == 200


def test_bodies_held_back_are_bounded_by_queue_bytes_limit_and_the_next_gets_a_503(budget):
    """Callers that each sent most of a large body and held back its last byte took the gateway to half a GB
    with 30 connections: the bodies it holds at once stay within queue_bytes_limit, a body read past it is
    answered 503, a small one still fits, and a body let go frees its share."""
    size = MAX - 4096
    held = [socket.create_connection(("127.0.0.1", _port(budget)), timeout=15) for _ in range(4)]
    try:
        for sock in held:
            sock.sendall(_head(size) + b" " * (size - 1))  # all but its last byte
        time.sleep(0.5)  # each is read as far as it came
        status, error = _whole(budget, size)
        assert status == 503 and error["type"] == "overloaded_error", error
        assert f"queue_bytes_limit {4 * MAX}" in error["message"] and "retry" in error["message"]
        assert _ok(budget)  # 4 x (MAX - 4096) held: a small body still fits
        held.pop().close()
        wait_for(lambda: _whole(budget, size)[0] == 400, 20, "the closed caller's share freed")
    finally:
        for sock in held:
            sock.close()


def test_callers_declaring_large_bodies_and_sending_none_lock_no_one_out(budget):
    """A budget counted by Content-Length let a few callers sending headers only refuse everyone with 503."""
    idle = [socket.create_connection(("127.0.0.1", _port(budget)), timeout=15) for _ in range(12)]
    try:
        for sock in idle:
            sock.sendall(_head(MAX - 1))  # declared, never sent
        time.sleep(0.5)
        assert _ok(budget)
    finally:
        for sock in idle:
            sock.close()


def test_a_gzip_body_counts_as_it_unpacks(budget):
    """Counted compressed, a few KB of gzip held the gateway's memory at megabytes each."""
    size = MAX - 4096
    held = []
    try:
        for _ in range(4):
            packer = zlib.compressobj(wbits=31)  # gzip
            sent = packer.compress(b" " * size) + packer.flush(zlib.Z_SYNC_FLUSH)  # all of it, decodable, unfinished
            sock = socket.create_connection(("127.0.0.1", _port(budget)), timeout=15)
            sock.sendall(_head(len(sent) + len(packer.flush()), "Content-Encoding: gzip") + sent)
            held.append(sock)
        time.sleep(0.5)
        status, error = _whole(budget, size)
        assert status == 503 and error["type"] == "overloaded_error", error
    finally:
        for sock in held:
            sock.close()
