"""A provider's mid-stream `error` event (Anthropic's overloaded_error/api_error, OpenAI's error chunk):
before any output it is retried like the 529/500 it stands for (one budget, backoff, a circuit failure, a
fallback when it persists), after output a stream opted in to `continue_streams` is continued, and
otherwise the caller gets the provider's own event as before. Through the low-level client, the gateway
(a plain HTTP client and an SDK at max_retries=0) and the shim, against the fake provider over HTTP."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anthropic
import httpx2 as httpx  # the SDKs' own HTTP client: installed with them (httpx is only in an extra)
import openai
import pytest

from broker import Pool, ProviderStreamError
from broker.fake_provider import FAULT_HEADER
from broker.shim import anthropic as shim_anthropic
from broker.shim import openai as shim_openai

from .conftest import TEST_SETTINGS, anthropic_args, fault, openai_args, sdk_has
from .test_resume import assert_one_message, chat_text, profile, sse_events

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

BOTH = ["prefill", "replay"]
PATHS = ["client", "gateway-httpx", "gateway-sdk", "shim"]


# per API: the method, the gateway's route, the request's arguments, the text of one well-formed answer
# (its events parsed as the caller's SDK must parse them), the SDK, the shim and the SDK's base path
APIS: dict[str, tuple[str, str, Any, Any, Any, Any, str]] = {
    "anthropic": ("messages.create", "/v1/messages", anthropic_args, assert_one_message, anthropic.Anthropic,
                  shim_anthropic.Anthropic, ""),
    "chat": ("chat.completions.create", "/v1/chat/completions", openai_args, chat_text, openai.OpenAI,
             shim_openai.OpenAI, "/v1"),
}  # fmt: skip


@pytest.fixture(scope="module")
def pool(fake):
    profiles = {
        "anthropic": profile(fake.url, "anthropic", BOTH),
        "openai": profile(fake.url, "openai", BOTH),
        "plain": profile(fake.url, "anthropic", [], fallbacks=[{"profile": "backup", "model": "claude-fake"}]),
        "plain-openai": profile(fake.url, "openai", []),
        "backup": profile(fake.url, "anthropic", [], min_workers=0),
    }
    settings = dict(TEST_SETTINGS, http="127.0.0.1:0", max_attempts=3, http_retry_backoff=0.1, circuit_failures=2)
    with Pool(profiles=profiles, **settings) as p:
        yield p


def arrivals(fake) -> int:
    return sum(len(times) for times in fake.stats()["arrivals"].values())


def retried(pool: Pool) -> int:
    with pool.client() as client:
        return client.snapshot().retries_by_reason.get("error_event", 0)


def rescued(pool: Pool) -> Counter[str]:
    with pool.client() as client:
        return Counter(client.snapshot().rescued)


def answer(pool: Pool, api: str, path: str, profile: str, prompt: str, spec: str) -> str:
    """The text of one streamed answer on `path`, checked to be one well-formed message."""
    method, route, args, text, sdk_class, shim_class, base = APIS[api]
    headers = {FAULT_HEADER: spec, "x-isopool-profile": profile}
    if path == "client":
        with pool.client() as client:
            call = client.submit(profile, method, **args(prompt, stream=True), extra_headers={FAULT_HEADER: spec})
            return text([e.json() for e in call])
    if path == "gateway-httpx":
        raw = httpx.post(pool.http_url + route, json=args(prompt, stream=True), headers=headers, timeout=30)
        assert raw.status_code == 200 and b'"error"' not in raw.content, raw.content
        return text(sse_events(raw.content))
    if path == "gateway-sdk":
        sdk = sdk_class(base_url=pool.http_url + base, max_retries=0, default_headers=headers)
    else:
        sdk = shim_class(pool=pool, pool_profile=profile, default_headers={FAULT_HEADER: spec})
    with sdk:
        if api == "chat":
            chunks = sdk.chat.completions.create(**args(prompt), stream=True)
            return text([chunk.model_dump(exclude_unset=True) for chunk in chunks])
        with sdk.messages.stream(**args(prompt)) as stream:
            message = stream.get_final_message()
    assert len(message.content) == 1 and message.stop_reason == "end_turn"
    return message.content[0].text


def clean_anthropic(fake, prompt: str) -> str:
    with anthropic.Anthropic(base_url=fake.url) as direct:
        return direct.messages.create(**anthropic_args(prompt)).content[0].text


def clean_chat(fake, prompt: str) -> str:
    with openai.OpenAI(base_url=fake.url + "/v1") as direct:
        return direct.chat.completions.create(**openai_args(prompt)).choices[0].message.content or ""


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("error", ["overloaded_error", "api_error"])
def test_an_error_event_before_output_is_retried_on_every_path(fake, pool, path, error):
    """Not opted in to continue_streams: nothing had reached the caller, so it is a retry."""
    prompt = f"event first {error} {path}"
    want = clean_anthropic(fake, prompt)
    fake.reset()
    before = retried(pool)
    assert answer(pool, "anthropic", path, "plain", prompt, f"error-event:after=0,error={error}") == want
    assert arrivals(fake) == 2 and retried(pool) == before + 1


@pytest.mark.parametrize("path", PATHS)
def test_an_error_chunk_before_output_is_retried_for_chat(fake, pool, path):
    prompt = f"chat event first {path}"
    want = clean_chat(fake, prompt)
    fake.reset()
    assert answer(pool, "chat", path, "plain-openai", prompt, "error-event:after=0,error=server_error") == want
    assert arrivals(fake) == 2


def test_a_persistent_error_event_backs_off_opens_the_circuit_and_falls_back(fake, pool):
    """Two overloaded events on the primary (a backoff between them), its circuit opens, the backup answers."""
    want = clean_anthropic(fake, "persistent")
    fake.reset()
    model = "claude-fake@error-event:after=0,times=9"
    with pool.client() as client:
        call = client.submit("plain", "messages.create", **anthropic_args("persistent", stream=True, model=model))
        text = assert_one_message([e.json() for e in call])
        circuit = client.snapshot().circuits[f"plain/{model}"]
    assert text == want
    assert call.served.profile == "backup" and call.served.attempts == 3  # type: ignore[union-attr]
    primary, backup = sorted(fake.stats()["arrivals"].values(), key=len, reverse=True)
    assert len(primary) == 2 and len(backup) == 1
    assert primary[1] - primary[0] >= 0.07  # backed off (http_retry_backoff 0.1 s, jittered by up to -25%)
    assert circuit.state == "open" and circuit.opened == 1


@pytest.mark.parametrize("path", PATHS)
def test_an_invalid_request_error_event_is_never_retried(fake, pool, path):
    fake.reset()
    spec = "error-event:after=0,error=invalid_request_error,times=9"
    if path == "gateway-httpx":
        assert b'"type":"invalid_request_error"' in raw_gateway(pool, "plain", "invalid", spec)
    else:
        with pytest.raises((ProviderStreamError, anthropic.APIStatusError), match="invalid_request_error"):
            answer(pool, "anthropic", path, "plain", f"invalid {path}", spec)
    assert arrivals(fake) == 1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("after", [1, 6])
def test_an_error_event_after_output_is_continued_when_opted_in(fake, pool, path, after):
    """After output (for Anthropic, already after its message_start) the event is not forwarded: the
    stream is continued by prefill (Anthropic) or replay (Chat), and the SDK parses one message."""
    prompt, spec = f"event after {after} {path}", f"error-event:after={after}"
    before = rescued(pool)
    assert answer(pool, "anthropic", path, "anthropic", prompt, spec) == clean_anthropic(fake, prompt)
    assert answer(pool, "chat", path, "openai", prompt, spec) == clean_chat(fake, prompt)
    assert rescued(pool) - before == Counter({"prefill": 1, "replay": 1})


def raw_gateway(pool: Pool, profile: str, prompt: str, spec: str) -> bytes:
    body = {**anthropic_args(prompt), "stream": True}
    headers = {FAULT_HEADER: spec, "x-isopool-profile": profile, "anthropic-version": "2023-06-01"}
    raw = httpx.post(pool.http_url + "/v1/messages", json=body, headers=headers, timeout=30)
    assert raw.status_code == 200
    return raw.content


@pytest.mark.parametrize(
    ("profile", "spec", "attempts"),
    [
        ("plain", "error-event:after=6", 1),  # after output, not opted in
        ("plain", "error-event:after=0,times=9", 3),  # before output, the budget spent (the fallback too has the fault)
        ("anthropic", "error-event:after=6,times=9", 3),  # opted in, the continuations' budget spent
    ],
)
def test_an_error_event_not_rescued_reaches_the_caller_as_the_providers_own(fake, pool, profile, spec, attempts):
    fake.reset()
    content = raw_gateway(pool, profile, f"raw {spec}", spec)
    error = b'{"type":"error","error":{"type":"overloaded_error","message":"injected mid-stream error"}}'
    tail = b"event: error\ndata: " + error + b"\n\n"
    assert content.endswith(tail) and content.count(b"event: error") == 1, content
    assert arrivals(fake) == attempts
    for path in ("gateway-sdk", "shim"):
        with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
            answer(pool, "anthropic", path, profile, f"{path} {spec}", spec)
    with pool.client() as client:
        events = []
        with pytest.raises(ProviderStreamError, match="overloaded_error"):
            for event in client.submit(profile, "messages.create", **anthropic_args(f"client {spec}", stream=True),
                                       extra_headers={FAULT_HEADER: spec}):  # fmt: skip
                events.append(event.json())
    assert events[-1]["type"] == "error"


def test_an_error_event_that_cannot_be_continued_reaches_the_caller_as_the_providers_own(fake, pool):
    """Opted in, but a Responses stream is never continued: its caller gets the provider's own event."""
    fake.reset()
    spec = "error-event:after=3,error=server_error"
    body = {"model": "gpt-fake", "input": "never continued", "stream": True}
    headers = {FAULT_HEADER: spec, "x-isopool-profile": "openai"}
    raw = httpx.post(pool.http_url + "/v1/responses", json=body, headers=headers, timeout=30).content
    last = raw.strip().split(b"\n\n")[-1]
    assert raw.count(b"event: error") == 1 and last.startswith(b"event: error\n") and b'"server_error"' in last, raw
    assert b"isopool" not in raw and arrivals(fake) == 1  # the continuation was refused before it was sent
    if not sdk_has("responses"):
        return  # the pool's openai predates the Responses API: a low-level call of it is refused (the gateway relays)
    with pool.client() as client:
        events = []
        with pytest.raises(ProviderStreamError, match="server_error") as raised:
            for event in client.submit("openai", "responses.create", **{**body, "input": "client"}, **fault(spec)):
                events.append(event.json())
    assert events[-1]["type"] == "error" and "not continuable: responses.create" in raised.value.info.rescue
