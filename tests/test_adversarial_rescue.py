"""Adversarial review of rescue (issue 18): fallbacks named by a caller, circuits and continued streams,
tried as a careless user and a hostile local caller would. Each test is a way the pool was made to hang,
answer twice or not at all, or be tricked; each failed before its fix."""

from __future__ import annotations

import socket
import time

import httpx2 as httpx  # the SDKs' own HTTP client: installed with them (httpx is only in an extra)
import pytest

from broker import Pool
from broker.errors import IsopoolError
from broker.fake_provider import LATENCY_HEADER

from .conftest import TEST_SETTINGS, openai_args

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker


@pytest.fixture(scope="module")
def pool(fake):
    base = {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1, "spare_workers": 1, "max_workers": 4}
    allow = [{"profile": "backup"}, {"profile": "openai", "model": "gpt-fake*"}]
    with Pool(profiles={"openai": base, "backup": base}, request_fallbacks=allow, http="127.0.0.1:0",
              **TEST_SETTINGS) as p:  # fmt: skip
        yield p


def post(pool: Pool, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(pool.http_url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


@pytest.mark.parametrize("where", ["body", "header", "model"])
def test_long_fallback_names_are_refused_not_left_unanswered(fake, pool, where):
    """Four allowed fallbacks with long model names make a SUBMIT header over the broker's 4 KiB: the
    broker refused it under request id 0, which the client drops, and the gateway call hung forever."""
    names = [f"backup/gpt-fake-{i}-" + "x" * 1500 for i in range(4)]
    body = openai_args("long names")
    if where == "model":  # the same without fallbacks: a model name as long
        response = post(pool, {**body, "model": "gpt-fake-" + "x" * 5000})
    elif where == "body":
        response = post(pool, {**body, "fallbacks": names})
    else:
        response = post(pool, body, **{"x-isopool-fallbacks": ",".join(names)})
    assert response.status_code == 400, response.text
    assert "fallback" in response.json()["error"]["message"]


def test_a_callers_own_short_timeout_never_opens_the_circuit_others_share(fake):
    """A caller that sets itself a first_event_timeout shorter than a healthy model's first token
    (0.3 s against 1 s) fails by its own limit, not the provider's: it counted as the provider's
    silence, so two such calls opened the primary's circuit and sent everyone's calls to the backup."""
    model = "gpt-fake@slow-first:delay=1,times=100"
    base = {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1, "max_workers": 3}
    primary = {**base, "fallbacks": [{"profile": "backup"}]}
    settings = dict(TEST_SETTINGS, circuit_failures=2, circuit_cooldown=30, circuit_cooldown_max=30)
    with Pool(profiles={"primary": primary, "backup": base}, **settings) as pool, pool.client() as client:
        for i in range(2):  # the hasty caller: its calls end by its own limit
            hasty = client.submit("primary", "chat.completions.create", first_event_timeout=0.3, max_attempts=1,
                                  **openai_args(f"hasty {i}", model=model))  # fmt: skip
            with pytest.raises(IsopoolError):
                hasty.result()
        circuit = client.snapshot().circuits.get(f"primary/{model}")
        assert circuit is None or circuit.state == "closed", circuit
        polite = client.submit("primary", "chat.completions.create", **openai_args("polite", model=model))
        polite.result()
        assert (polite.served.profile, polite.served.attempts) == ("primary", 1), polite.served


def test_a_call_waiting_for_a_closed_circuit_does_not_hold_up_calls_that_a_free_deployment_can_run(fake):
    """Deployment a's circuit is open for one model, b's closed but busy: a call for that model waits
    for b. It waited at the head of the queue, and every call behind it, of any model and any caller,
    waited with it while a sat idle (for as long as b's stream ran)."""
    flaky = "gpt-fake@http-500"  # once per conversation: the first attempt fails, its retry is answered
    deps = [{"name": "a"}, {"name": "b"}]
    profile = {"kind": "openai", "base_url": fake.url + "/v1", "deployments": deps, "strategy": "ordered",
               "min_workers": 1, "spare_workers": 0, "max_workers": 1}  # fmt: skip
    settings = dict(TEST_SETTINGS, circuit_failures=1, circuit_cooldown=30, circuit_cooldown_max=30)
    fake.reset()
    with Pool(profiles={"openai": profile}, **settings) as pool, pool.client() as client:
        opener = client.submit("openai", "chat.completions.create", **openai_args("opens a", model=flaky))
        assert opener.result().status == 200 and opener.served.deployment == "b"  # a failed it: a's circuit opens
        assert client.snapshot().circuits["openai.a/" + flaky].state == "open"
        slow = {"extra_headers": {LATENCY_HEADER: "ttft=1.0"}}
        long_ = {"extra_headers": {LATENCY_HEADER: "ttft=4.0"}}
        short_on_a = client.submit("openai", "chat.completions.create", **openai_args("on a"), **slow)
        long_on_b = client.submit("openai", "chat.completions.create", **openai_args("on b"), **long_)
        short_on_a.result()
        assert short_on_a.served.deployment == "a"  # a is free again; b runs for 3 s more
        waiting = client.submit("openai", "chat.completions.create", **openai_args("waits for b", model=flaky))
        started = time.monotonic()
        behind = client.submit("openai", "chat.completions.create", **openai_args("any model"))
        behind.result()
        assert behind.served.deployment == "a"
        assert time.monotonic() - started < 2.0, "a call a free deployment could run waited for b's stream"
        assert waiting.result().status == 200 and long_on_b.result().status == 200


def test_circuits_of_many_distinct_failing_models_stay_bounded(monkeypatch):
    """A caller naming a new model in every call while the upstream rate-limits (a 429 naming its wait
    opens a circuit at once) made one open circuit per name, never forgotten: only closed ones were,
    so the broker's memory and every stats snapshot grew with each name (3 KiB each)."""
    from broker.config import load_settings
    from broker.protocol import Submit
    from broker.server import routing
    from broker.server.state import Reason, Request

    monkeypatch.setattr(routing, "_MAX_CIRCUITS", 50)
    router = routing.Router(load_settings(env={}, profiles={"p": {"kind": "openai"}}))
    for i in range(200):
        req = Request(i, b"c", i, Submit(i, "p", f"model-{i}"), b"", "p", 20.0, 20.0, 100.0, 0.0, group="p")
        router.failed(req, Reason.HTTP_429, 30.0, float(i))
    assert len(router.circuits) <= 50 and len(router.circuit_snapshots(200.0)) <= 50
    assert router.circuits["p", "model-199"].state.name == "OPEN"  # the latest are kept
    opened = list(router.circuits.items())[:20]
    closed = [(("p", f"closed-{i}"), routing.Circuit(router.circuit_limits)) for i in range(30)]
    router.circuits = dict(closed + opened)  # at the cap: the closed ones go, the 20 open ones stay
    router.failed(Request(0, b"c", 0, Submit(0, "p", "new"), b"", "p", 20.0, 20.0, 100.0, 0.0, group="p"),
                  Reason.HTTP_429, 30.0, 300.0)  # fmt: skip
    assert len(router.circuits) == 21


def test_a_body_that_is_not_json_moved_to_a_model_fallback_is_not_refused_by_the_pool(fake):
    """An upload (multipart) whose own target is down, on a profile whose fallback names a model: the
    fallback's worker refused it ("needs a JSON object body", a 400 of the pool's), which the caller got
    in place of any provider's answer. A body that names no model is sent as it is, like one without."""
    with socket.socket() as s:  # a port nothing listens on: connection refused, a provider failure
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    primary = {
        "kind": "openai",
        "base_url": dead,
        "min_workers": 1,
        "fallbacks": [{"profile": "backup", "model": "gpt-fake"}],
    }
    backup = {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1}
    settings = dict(TEST_SETTINGS, circuit_failures=0, http="127.0.0.1:0")
    fake.reset()
    with Pool(profiles={"openai": primary, "backup": backup}, **settings) as pool:
        response = httpx.post(pool.http_url + "/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF....")},
                              data={"model": "whisper-1"}, timeout=30)  # fmt: skip
    assert "JSON object body" not in response.text, response.text
    # the fake has no such route: the call ends with its own target's first error, and says it came from there
    assert response.headers["x-isopool-profile"] == "openai" and "provider_connection" in response.text


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_deeply_nested_fallbacks_are_a_400_not_a_crash_of_the_handler(fake, pool, content_type):
    """msgspec raises RecursionError (not a DecodeError) past ~1000 levels: the gateway's handler died
    on it with a bare 500 and a traceback in the log, once per request a caller cared to send."""
    depth = 5000
    body = b'{"model": "gpt-fake", "messages": [], "fallbacks": ' + b"[" * depth + b"]" * depth + b"}"
    response = httpx.post(pool.http_url + "/v1/chat/completions", content=body,
                          headers={"content-type": content_type}, timeout=10)  # fmt: skip
    if content_type == "application/json":  # checked by the gateway
        assert response.status_code == 400, response.text
    assert "error" in response.json(), response.text  # an answer, not the web server's bare 500


def test_a_silent_provider_is_waited_for_once_more_not_once_per_key_and_the_fallback_answers(fake):
    """Silence is retried once per call, then the call moves on. A profile of three deployments (keys
    of one silent provider) sent the call to each in turn, waiting out headers_timeout three times:
    the budget of 3 was spent there and the configured fallback never asked."""
    deps = [{"name": "k1"}, {"name": "k2"}, {"name": "k3"}]
    base = {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1, "spare_workers": 0, "max_workers": 1}
    primary = {**base, "deployments": deps, "fallbacks": [{"profile": "backup", "model": "gpt-fake"}]}
    settings = dict(TEST_SETTINGS, headers_timeout=0.5, max_attempts=3, circuit_failures=0)
    fake.reset()
    with Pool(profiles={"primary": primary, "backup": base}, **settings) as pool, pool.client() as client:
        started = time.monotonic()
        call = client.submit("primary", "chat.completions.create",
                             **openai_args("silent keys", model="gpt-fake@no-headers:times=100"))  # fmt: skip
        assert call.result().status == 200
        assert call.served.profile == "backup" and call.served.attempts <= 3, call.served
        assert time.monotonic() - started < 1.5  # two silences at most, not three


def test_the_budget_left_for_the_fallbacks_is_not_spent_on_another_key():
    """Three keys failing with 5xx and one fallback, a budget of 3: the third attempt is the fallback's
    (the budget left is what the targets after it need); it went to the third key, and the fallback
    was never asked."""
    from broker.config import load_settings
    from broker.protocol import Submit
    from broker.server.routing import Move, Router
    from broker.server.state import Reason, Request

    deps = [{"name": "k1"}, {"name": "k2"}, {"name": "k3"}]
    primary = {"kind": "openai", "deployments": deps, "fallbacks": [{"profile": "b"}]}
    s = load_settings(env={}, max_attempts=3, profiles={"p": primary, "b": {"kind": "openai"}})
    req = Request(1, b"c", 1, Submit(1, "p", "m"), b"", "p", 20.0, 20.0, 100.0, 0.0, attempt=2, group="p.k2")
    req.hops, req.target_attempts, req.failed_on = [("p", ""), ("b", "")], 2, {"p.k1"}
    req.used = req.hops[:1]
    assert Router(s).next(req, Reason.HTTP_5XX, "", [Reason.HTTP_5XX], None, 0.0, 0.5) == Move(("b", ""), "fallback")


@pytest.mark.parametrize("model", ["gpt-fake\r\nX-Evil: 1", "gpt-fake\x00", "gpt-fake-modèle"])
@pytest.mark.parametrize("stream", [False, True])
def test_who_answered_is_said_in_headers_whatever_the_model_name(fake, pool, model, stream):
    """`x-isopool-model` carries the model the caller named: with a control character the gateway's
    handler died writing its headers after the provider had answered (a dropped connection, or a bare
    500), and a name that is not ASCII made the shim raise UnicodeEncodeError on a good answer."""
    from broker.shim import openai as shim_openai

    args = openai_args(f"odd name {stream}", model=model, stream=stream)
    response = post(pool, args)
    assert response.status_code == 200 and "x-evil" not in response.headers, response.text
    assert response.headers["x-isopool-profile"] == "openai" and "\n" not in response.headers["x-isopool-model"]
    with shim_openai.OpenAI(pool=pool) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(**openai_args(f"shim {stream}", model=model))
    assert raw.status_code == 200 and raw.headers["x-isopool-model"].isprintable()


def test_a_call_that_fails_everywhere_gets_its_own_targets_first_error_even_when_a_fallback_refuses_it(fake):
    """The primary is down (503); its fallback refuses the call (here a 400 of its own, as a fallback
    model the key may not use would). The caller asked for the primary's model and got the
    fallback's refusal, not its own target's first provider error, which the README promises."""
    base = {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1, "spare_workers": 0, "max_workers": 2}
    primary = {**base, "fallbacks": [{"profile": "backup", "model": "gpt-fake@content-filter:times=100"}]}
    settings = dict(TEST_SETTINGS, http="127.0.0.1:0", circuit_failures=0)
    fake.reset()
    with Pool(profiles={"primary": primary, "backup": base}, **settings) as pool:
        args = openai_args("fails everywhere", model="gpt-fake@unavailable:for=600")
        response = httpx.post(pool.http_url + "/v1/chat/completions", headers={"x-isopool-profile": "primary"},
                              json=args, timeout=30)  # fmt: skip
    assert response.status_code == 503, response.text  # the primary's own error, not the fallback's 400
    assert response.headers["x-isopool-attempts"] == "3" and response.headers["x-isopool-profile"] == "primary"


def test_an_overload_said_in_the_streams_first_event_is_retried_like_a_529(fake):
    """Anthropic may answer 200 and then say `overloaded_error` in an SSE `error` event. Before any
    output that is a 529 in other words, and nothing was delivered: it ended the call at its first
    attempt (ProviderStreamError), no retry, no fallback."""
    from .conftest import anthropic_args, fault

    profile = {"kind": "anthropic", "base_url": fake.url, "min_workers": 1, "spare_workers": 0}
    with Pool(profiles={"anthropic": profile}, **TEST_SETTINGS) as pool, pool.client() as client:
        call = client.submit("anthropic", "messages.create", **anthropic_args("overloaded at once", stream=True),
                             **fault("error-event:after=0"))  # fmt: skip
        kinds = [event.json()["type"] for event in call]
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "error" not in kinds
        assert call.served.attempts == 2 and call.served.rescue == "retry"
