"""The gateway's answers to a CORS preflight outside its APIs and to an expectation it cannot meet.

A preflight (`OPTIONS` with `Access-Control-Request-Method`) was answered 204 on any path, telling a browser
page that an endpoint exists where a GET or POST gets a 404; it now gets the same JSON 404 there. An `Expect`
other than `100-continue` was ignored and the request run; it now gets 417 Expectation Failed (RFC 9110
§10.1.1) and nothing reaches the pool.
"""

from __future__ import annotations

import json
import re
import socket

import pytest

from broker import Pool

from .conftest import TEST_SETTINGS, profiles
from .test_adversarial_gateway import BODY, ORIGIN, error_of, raw_post, send

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

ASKS = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,x-api-key"}


@pytest.fixture(scope="module")
def gateway(fake):
    settings = dict(TEST_SETTINGS, http="127.0.0.1:0", gateway_origins=ORIGIN)
    with Pool(profiles=profiles(fake.url, min_workers=1, spare_workers=0), **settings) as pool:
        yield pool


def accepted(pool: Pool) -> int:
    with pool.client() as client:
        return client.stats()["requests"].get("accepted", 0)


@pytest.mark.parametrize("path", ["/", "/chat/completions", "/messages", "/v2/messages", "/v1x"])
def test_a_preflight_outside_the_apis_gets_the_404_a_post_gets_there(gateway, path):
    post = send(gateway, "POST", path, BODY, content_type="application/json", Origin=ORIGIN)
    preflight = send(gateway, "OPTIONS", path, Origin=ORIGIN, **ASKS)
    assert preflight[0] == post[0] == 404
    assert error_of(preflight[2]) == error_of(post[2]) and path in error_of(preflight[2])["message"]
    assert preflight[1]["access-control-allow-origin"] == ORIGIN  # the page can read why
    assert "access-control-allow-methods" not in preflight[1]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions", "/model/m/invoke", "/openai/deployments"])
def test_a_preflight_on_a_served_path_is_still_answered(gateway, path):
    status, headers, _ = send(gateway, "OPTIONS", path, Origin=ORIGIN, **ASKS)
    assert status == 204 and headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in headers["access-control-allow-headers"]


@pytest.mark.parametrize("path", ["/v1/%2e%2e/x", "/v1/./messages", "/v1/a/%2E%2E/%2e%2e/b"])
def test_a_preflight_on_a_path_a_post_is_refused_at_gets_that_refusal(gateway, path):
    """A dot-segment path: the POST's 400 for the preflight too (it was told 204, the endpoint exists)."""
    post = send(gateway, "POST", path, BODY, content_type="application/json", Origin=ORIGIN)
    preflight = send(gateway, "OPTIONS", path, Origin=ORIGIN, **ASKS)
    assert preflight[0] == post[0] == 400 and error_of(preflight[2]) == error_of(post[2])


def test_a_preflight_asking_for_headers_that_are_not_utf8_is_refused(gateway):
    """The header list a preflight asks for is echoed back: one that is not UTF-8 is refused as such a header
    is on any request (it was cut at its first non-UTF-8 byte and echoed)."""
    asks = dict(ASKS, **{"Access-Control-Request-Headers": "content-type,x-caf\xe9"})
    status, _, body = send(gateway, "OPTIONS", "/v1/messages", Origin=ORIGIN, **asks)
    assert status == 400 and "access-control-request-headers" in error_of(body)["message"].lower()


def read_answer(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


@pytest.mark.parametrize("expectation", ["something-else", "100-continue, foo", "101-continue"])
def test_an_expectation_other_than_100_continue_is_417_and_never_reaches_the_pool(gateway, expectation):
    before = accepted(gateway)
    with socket.create_connection(("127.0.0.1", int(gateway.http_url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(raw_post(f"Expect: {expectation}\r\nConnection: close\r\n") + BODY)
        answer = read_answer(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417 Expectation Failed\r\n"), answer
    error = error_of(body)
    assert error["type"] == "invalid_request_error" and "100-continue" in error["message"], body
    assert expectation in error["message"]
    assert accepted(gateway) == before


def test_100_continue_in_any_case_still_gets_its_body_sent(gateway):
    with socket.create_connection(("127.0.0.1", int(gateway.http_url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(raw_post("Expect: 100-Continue\r\nConnection: close\r\n"))
        assert sock.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(BODY)
        head, _, body = read_answer(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(body)["type"] == "message"


def exchange(pool: Pool, data: bytes, whole: bool = True) -> bytes:
    """What the gateway answers to `data` on one connection: all it sends until it closes it, or (not `whole`)
    its first answer's head and the body its Content-Length counts."""
    with socket.create_connection(("127.0.0.1", int(pool.http_url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(data)
        if whole:
            return read_answer(sock)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            answer += sock.recv(65536)
        return answer


def _length(answer: bytes) -> int:
    return int(re.search(rb"\r\ncontent-length: *(\d+)", answer, re.IGNORECASE)[1])  # type: ignore[index]


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        ("Expect: 100-continue\r\nExpect: something-else\r\n", 417),  # two lines are one list (RFC 9110 §5.3)
        ("Expect: \r\n", 200),  # an empty list: nothing expected
        ("Expect: 100-continue,\r\n", 200),  # an empty element is ignored (RFC 9110 §5.6.1)
    ],
)
def test_an_expect_list_is_read_whole_with_its_empty_elements_ignored(gateway, lines, status):
    before = accepted(gateway)
    answer = exchange(gateway, raw_post(lines + "Connection: close\r\n") + BODY)
    final = answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert final.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert accepted(gateway) == before + (status == 200)


HELD_BACK = "Expect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"


@pytest.mark.parametrize(
    ("request_line", "extra", "length", "status"),
    [
        ("POST /v2/messages", "", 90, 404),
        ("POST /v1/%2e%2e/admin", "", 90, 400),
        ("POST /v1/messages", "anthropic-note: caf\xe9\r\n", 90, 400),
        ("POST /v1/messages", "", 10**9, 413),
    ],
)
def test_a_request_refused_on_its_headers_is_refused_before_its_held_back_body_is_invited(
    gateway, request_line, extra, length, status
):
    """A caller that waits for `100 Continue` gets the refusal instead, which says the connection closes: its
    body, never sent, is not waited for (nor its next request read as that body)."""
    head = f"{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}" + HELD_BACK.format(length=length)
    answer = exchange(gateway, head.encode("latin-1"), whole=False)  # no body: the caller waits for the 100
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert b"Connection: close" in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")
