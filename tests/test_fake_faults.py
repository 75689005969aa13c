"""The fake provider's faults for rescue and hygiene do what `--help` says, seen over plain HTTP:
status, headers and body shape, stream framing, windows in time, prefill per model."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the SDKs' own HTTP client: installed with them, no SDK in the way
import pytest
from aiohttp import web
from click.testing import CliRunner

from broker.cli.commands import main
from broker.fake_provider import FAULT_HEADER, FakeProviderProcess
from broker.fake_provider.server import FakeProvider, Latency

from .conftest import wait_for

PATHS = {"anthropic": "/v1/messages", "chat": "/v1/chat/completions", "responses": "/v1/responses"}


def body(api: str, prompt: str, **extra) -> dict:
    """A request of its own: a header fault fires once per body in the session's fake provider."""
    prompt = f"fake faults: {prompt}"
    if api == "anthropic":
        return {"model": "claude-fake", "max_tokens": 16, "messages": [{"role": "user", "content": prompt}], **extra}
    if api == "chat":
        return {"model": "gpt-fake", "messages": [{"role": "user", "content": prompt}], **extra}
    return {"model": "gpt-fake", "input": prompt, **extra}


def post(fake, api: str, payload: dict, spec: str = "", timeout: float = 10) -> httpx.Response:
    return httpx.post(fake.url + PATHS[api], json=payload, headers={FAULT_HEADER: spec}, timeout=timeout)


def events(raw: str) -> list[tuple[str, str]]:
    """(event name, data) of each SSE block."""
    out = []
    for block in filter(None, raw.split("\n\n")):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields.get("event", ""), fields["data"]))
    return out


@pytest.mark.parametrize(
    ("spec", "headers"),
    [("http-429", {}), ("http-429:retry_after=2", {"retry-after": "2"}),
     ("http-429:retry_after_ms=1500", {"retry-after-ms": "1500"})],
)  # fmt: skip
def test_429_with_and_without_retry_after(fake, spec, headers):
    for api in ("anthropic", "chat"):
        answer = post(fake, api, body(api, f"429 {spec}"), spec)
        assert answer.status_code == 429
        assert {k: v for k, v in answer.headers.items() if k.startswith("retry-after")} == headers
        error = answer.json()["error"]
        assert error["type"] == "rate_limit_error"


def test_unavailable_for_a_window_then_healthy(fake):
    spec = "unavailable:for=1"
    assert post(fake, "chat", body("chat", "down 1"), spec).status_code == 503
    down = post(fake, "anthropic", body("anthropic", "down 2"), spec)  # another body, the same outage
    assert down.status_code == 503 and down.json()["error"]["type"] == "api_error"
    wait_for(lambda: post(fake, "chat", body("chat", "down 3"), spec).status_code == 200, 5, "the outage to end")
    assert post(fake, "chat", body("chat", "down 1"), spec).status_code == 200


def test_no_headers_sends_nothing_and_stall_first_sends_headers(fake):
    before = fake.stats()["disconnects"]
    with pytest.raises(httpx.ReadTimeout):  # not even a status line
        post(fake, "anthropic", body("anthropic", "silent accept", stream=True), "no-headers", timeout=0.5)
    with httpx.stream("POST", fake.url + PATHS["chat"], json=body("chat", "stall first", stream=True),
                      headers={FAULT_HEADER: "stall-first:interval=0.1"}, timeout=5) as answer:  # fmt: skip
        assert answer.status_code == 200 and answer.headers["content-type"] == "text/event-stream"
    wait_for(lambda: fake.stats()["disconnects"] >= before + 2, 5, "the fake to notice both clients left")


TERMINAL = {"anthropic": "message_stop", "chat": 'finish_reason":"stop', "responses": "response.completed"}


@pytest.mark.parametrize("api", list(PATHS))
def test_cut_ends_cleanly_without_the_terminal_event(fake, api):
    whole = post(fake, api, body(api, f"cut {api}", stream=True)).text
    cut = post(fake, api, body(api, f"cut {api}", stream=True), "cut")
    assert cut.status_code == 200 and TERMINAL[api] in whole and TERMINAL[api] not in cut.text
    assert "[DONE]" not in cut.text and whole.startswith(cut.text) and len(events(cut.text)) > 3
    assert len(events(post(fake, api, body(api, f"cut 2 {api}", stream=True), "cut:after=2").text)) == 2


def test_no_done_sends_finish_and_usage_then_ends_or_stays_open(fake):
    payload = body("chat", "no done", stream=True, stream_options={"include_usage": True})
    sent = events(post(fake, "chat", payload, "no-done").text)
    assert json.loads(sent[-2][1])["choices"][0]["finish_reason"] == "stop"
    assert json.loads(sent[-1][1])["usage"]["completion_tokens"] > 0
    read, held = "", dict(payload, messages=[{"role": "user", "content": "open"}])
    with pytest.raises(httpx.ReadTimeout):  # open: the usage arrives, then nothing, and no end
        with httpx.stream("POST", fake.url + PATHS["chat"], json=held, headers={FAULT_HEADER: "no-done:open=true"},
                          timeout=1) as answer:  # fmt: skip
            for text in answer.iter_text():
                read += text
    assert '"usage"' in read and "[DONE]" not in read


@pytest.mark.parametrize("api", list(PATHS))
def test_malformed_is_one_line_that_is_not_json_and_the_rest_intact(fake, api):
    clean = events(post(fake, api, body(api, f"bad {api}", stream=True)).text)
    sent = events(post(fake, api, body(api, f"bad {api}", stream=True), "malformed").text)
    bad = []
    for i, (_, data) in enumerate(sent):
        try:
            json.loads(data) if data != "[DONE]" else None
        except json.JSONDecodeError:
            bad.append(i)
    assert len(bad) == 1 and bad[0] == 3 and sent[:3] + sent[4:] == clean


def test_context_length_in_each_providers_shape(fake):
    answer = post(fake, "anthropic", body("anthropic", "too long"), "context-length")
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
    assert answer.json()["error"]["message"].startswith("prompt is too long: ")
    assert answer.json()["error"]["message"].endswith(" tokens > 200000 maximum")
    for api, param in (("chat", "messages"), ("responses", "input")):
        error = post(fake, api, body(api, "too long"), "context-length:limit=8192").json()["error"]
        assert (error["code"], error["type"], error["param"]) == ("context_length_exceeded", "invalid_request_error",
                                                                  param)  # fmt: skip
    assert "maximum context length is 8192 tokens" in error["message"] or "context window" in error["message"]


def test_content_filter_is_azures_400_for_openai_and_a_refusal_for_anthropic(fake):
    answer = post(fake, "chat", body("chat", "filtered"), "content-filter")
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["code"] == "content_filter" and error["param"] == "prompt"
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert error["innererror"]["content_filter_result"]["violence"]["filtered"] is True
    refused = post(fake, "anthropic", body("anthropic", "filtered"), "content-filter")
    assert refused.status_code == 200 and refused.json()["stop_reason"] == "refusal"
    stream = post(fake, "anthropic", body("anthropic", "filtered s", stream=True), "content-filter").text
    assert '"stop_reason":"refusal"' in stream


def test_prefill_is_continued_or_refused_per_model(fake):
    ask = body("anthropic", "prefill me")
    whole = post(fake, "anthropic", ask).json()["content"][0]["text"]
    head = whole[: whole.index(" ", 5)]
    prefilled = dict(ask, messages=[*ask["messages"], {"role": "assistant", "content": head}])
    first, again = (post(fake, "anthropic", prefilled).json() for _ in range(2))
    assert head + first["content"][0]["text"] == whole and again["content"] == first["content"]
    assert first["usage"]["output_tokens"] < 16
    refused = post(fake, "anthropic", dict(prefilled, model="claude-fake-noprefill"))
    assert refused.status_code == 400 and refused.json()["error"] == {
        "type": "invalid_request_error",
        "message": "This model does not support assistant message prefill. The conversation must end with a user "
        "message.",
    }
    spaced = dict(ask, messages=[*ask["messages"], {"role": "assistant", "content": head + " "}])
    assert "trailing whitespace" in post(fake, "anthropic", spaced).json()["error"]["message"]


def test_help_lists_every_new_fault():
    text = CliRunner().invoke(main, ["fake-provider", "--help"], terminal_width=200).output
    for kind in ("unavailable", "no-headers", "cut", "no-done", "malformed", "context-length", "content-filter"):
        assert f"  {kind} " in text, kind
    assert "retry_after_ms" in text and "-noprefill" in text


def test_hold_keeps_streams_before_their_first_event_until_released():
    with FakeProviderProcess(Latency(tokens=4)) as fake:
        for bad in ('{"hold": "yes"}', "[]", "not json"):
            assert httpx.post(fake.url + "/_isopool/hold", content=bad).status_code == 400, bad
        fake.hold()
        with ThreadPoolExecutor(2) as threads:
            held = threads.submit(post, fake, "anthropic", body("anthropic", "held", stream=True))
            wait_for(lambda: fake.stats()["active"] == 1, 10, "the stream to arrive")
            time.sleep(0.3)
            assert not held.done() and fake.stats()["completed"] == 0
            fake.hold(False)
            names = [name for name, _ in events(held.result(timeout=10).text)]
            fake.hold()
            fake.reset()  # a reset ends a hold too: no test is left with a held fake
            names_after_reset = [
                name for name, _ in events(post(fake, "anthropic", body("anthropic", "reset", stream=True)).text)
            ]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names_after_reset[-1] == "message_stop"


def test_a_client_gone_before_a_streams_headers_is_counted_not_logged_as_a_server_error(caplog):
    """A caller that resets its connection right after sending (a closed client, a watchdog kill): the fake
    counts a disconnect. Writing the headers raised out of the handler, and aiohttp logged "Error handling
    request" with a traceback for each one (40 of 40 before the fix)."""

    async def run() -> tuple[int, int]:
        provider = FakeProvider(Latency(tokens=2000, gap=0.001))
        runner = web.AppRunner(provider.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            port = runner.addresses[0][1]
            payload = json.dumps(body("anthropic", "gone before headers", stream=True)).encode()
            head = (f"POST {PATHS['anthropic']} HTTP/1.1\r\nhost: fake\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\n\r\n").encode()  # fmt: skip
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: RST
                    sock.sendall(head + payload)
                await asyncio.sleep(0.02)
            for _ in range(100):  # each handler has met its closed connection
                if provider.disconnects + provider.completed >= 20:
                    break
                await asyncio.sleep(0.05)
            return provider.disconnects, provider.completed
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.ERROR, logger="aiohttp"):
        disconnects, completed = asyncio.run(run())
    assert (disconnects, completed) == (20, 0)
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")], caplog.text[-2000:]
