"""Adversarial review of rescue (issue 18): fallbacks named by a caller, circuits and continued streams,
tried as a careless user and a hostile local caller would. Each test is a way the pool was made to hang,
answer twice or not at all, or be tricked; each failed before its fix."""

from __future__ import annotations

import httpx2 as httpx  # the SDKs' own HTTP client: installed with them (httpx is only in an extra)
import pytest

from broker import Pool
from broker.errors import IsopoolError

from .conftest import TEST_SETTINGS, openai_args


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
