"""Fallbacks a gateway caller names itself (a `fallbacks` list in the body, or the
`x-isopool-fallbacks` header): allowed only as `request_fallbacks` lists them, taken out of the body
before it goes upstream, except Anthropic's own server-side `fallbacks` under its beta header. The fake
provider names each answer after the body it got (its id), which shows what reached it."""

from __future__ import annotations

import httpx2 as httpx  # the SDKs' own HTTP client: installed with them (httpx is only in an extra)
import pytest

from broker import Pool
from broker.fake_provider.content import Reply

from .conftest import TEST_SETTINGS, anthropic_args, openai_args

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

DOWN = "gpt-fake@unavailable:for=600"


@pytest.fixture(scope="module")
def pool(fake):
    base = {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1, "spare_workers": 1, "max_workers": 4}
    profiles = {"openai": base, "backup": base, "anthropic": {"kind": "anthropic", "base_url": fake.url}}
    allow = [{"profile": "backup"}, {"profile": "openai", "model": "gpt-fake-*"}]
    with Pool(profiles=profiles, request_fallbacks=allow, http="127.0.0.1:0", **TEST_SETTINGS) as p:
        yield p


def post(pool: Pool, body: dict, path: str = "/v1/chat/completions", **headers: str) -> httpx.Response:
    return httpx.post(pool.http_url + path, json=body, headers=headers, timeout=60)


def answered_for(body: dict) -> str:
    """The id the fake gives its answer to exactly this body."""
    return Reply(body, 16).ident("")


def test_fallbacks_in_the_body_are_used_and_never_reach_the_provider(fake, pool):
    fake.reset()
    body = openai_args("body fallbacks", model=DOWN)
    response = post(pool, {**body, "fallbacks": [{"profile": "backup", "model": "gpt-fake"}]})
    assert response.status_code == 200, response.text
    assert response.headers["x-isopool-profile"] == "backup" and response.json()["model"] == "gpt-fake"
    assert response.json()["id"] == "chatcmpl-" + answered_for({**body, "model": "gpt-fake"})  # no `fallbacks`


def test_fallbacks_in_a_header_are_used_and_the_header_stays_here(fake, pool):
    fake.reset()
    response = post(pool, openai_args("header fallbacks", model=DOWN), **{"x-isopool-fallbacks": "gpt-fake-1m"})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "gpt-fake-1m" and response.headers["x-isopool-rescue"] == "fallback"
    seen = httpx.get(f"{fake.url}/_isopool/requests/{response.headers['x-request-id']}", timeout=10).json()
    assert "x-isopool-fallbacks" not in seen


@pytest.mark.parametrize(
    "fallbacks, says",
    [
        (["claude-fake"], "'openai/claude-fake' is not allowed by this pool (setting request_fallbacks"),
        ([{"profile": "anthropic"}], "'anthropic' is not allowed by this pool (setting request_fallbacks"),
        (["a", "b", "c", "d", "e"], "at most 4 fallbacks"),
        ("backup", "fallbacks must be a list"),
    ],
)
def test_fallbacks_the_pool_does_not_allow_are_refused_naming_the_setting(fake, pool, fallbacks, says):
    fake.reset()
    response = post(pool, {**openai_args("refused"), "fallbacks": fallbacks})
    assert response.status_code == 400 and says in response.json()["error"]["message"]
    assert not fake.stats()["arrivals"]  # nothing was sent


def test_anthropics_own_server_side_fallbacks_pass_through_untouched(fake, pool):
    fake.reset()
    body = {**anthropic_args("server-side"), "fallbacks": [{"model": "claude-other"}]}  # not allowed here
    beta = {"anthropic-version": "2023-06-01", "anthropic-beta": "server-side-fallback-2026-01-01"}
    response = post(pool, body, "/v1/messages", **beta)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "msg_" + answered_for(body)  # the body went on with its `fallbacks`


def test_the_shim_takes_fallbacks_from_its_sdks_extra_body(fake, pool):
    from broker.shim import openai as shim_openai

    fake.reset()
    body = openai_args("shim fallbacks", model=DOWN)
    with shim_openai.OpenAI(pool=pool) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            **body, extra_body={"fallbacks": [{"profile": "backup", "model": "gpt-fake"}]}
        )
    assert raw.headers["x-isopool-profile"] == "backup"
    assert raw.parse().id == "chatcmpl-" + answered_for({**body, "model": "gpt-fake"})  # no `fallbacks` upstream


def test_a_bare_name_is_a_profile_if_one_has_it_else_a_model_of_the_requests_own():
    from broker import routes
    from broker.config import load_settings

    s = load_settings(env={}, profiles={"p": {"kind": "openai"}, "q": {"kind": "openai"}},
                      request_fallbacks=[{"profile": "p"}, {"profile": "q"}])  # fmt: skip
    assert routes.own_chain(s, "p", [("", "q"), ("", "m"), ("q", "m2")]) == [
        ("p", ""),
        ("q", ""),
        ("p", "m"),
        ("q", "m2"),
    ]
