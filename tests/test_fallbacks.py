"""Fallbacks, through every path (the gateway with a plain HTTP client and with an SDK at
max_retries=0, the shim at its SDK's defaults, the low-level client that batch uses, and batch
itself): a call its own target cannot answer is answered by the next one of its chain, within the
call's one budget, and the answer says who answered. Faults ride in the model name
(`gpt-fake@<fault>`), so that a fallback to the plain model is served cleanly by the same fake."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx2 as httpx  # the SDKs' own HTTP client: installed with them (httpx is only in an extra)
import openai
import pytest

from broker import Pool
from broker.batch import run as run_batch
from broker.errors import ProviderStatusError
from broker.fake_provider import FAULT_HEADER
from broker.server.stats import MAX_FALLBACK_PAIRS, Stats
from broker.shim import anthropic as shim_anthropic
from broker.shim import openai as shim_openai
from worker.fallback import failure_of

from .conftest import TEST_SETTINGS, anthropic_args, openai_args

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

HEADERS_TIMEOUT = 1.0
MAX_ATTEMPTS = 3
DOWN = "gpt-fake@unavailable:for=600"  # 503 for every request, all test long


@pytest.fixture(scope="module")
def pool(fake):
    base = {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1, "spare_workers": 1, "max_workers": 4}
    chain = {"fallbacks": [{"profile": "backup", "model": "gpt-fake"}], "context_fallback": {"model": "gpt-fake-1m"}}
    # no circuits: each test counts the attempts of its own calls (the circuits have their own tests)
    settings = dict(TEST_SETTINGS, http="127.0.0.1:0", headers_timeout=HEADERS_TIMEOUT, max_attempts=MAX_ATTEMPTS,
                    circuit_failures=0)  # fmt: skip
    claude = {"kind": "anthropic", "base_url": fake.url, "context_fallback": {"model": "claude-fake-1m"}}
    with Pool(profiles={"openai": {**base, **chain}, "backup": base, "anthropic": claude}, **settings) as p:
        yield p


Answer = tuple[int, Any, dict[str, str]]  # HTTP status, JSON body, the x-isopool-* headers


def isopool_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-isopool-")}


def via_gateway_httpx(pool: Pool, args: dict[str, Any]) -> Answer:
    response = httpx.post(pool.http_url + "/v1/chat/completions", json=args, timeout=60)
    return response.status_code, response.json(), isopool_headers(response.headers)


def via_gateway_sdk(pool: Pool, args: dict[str, Any]) -> Answer:
    with openai.OpenAI(base_url=pool.http_url + "/v1", max_retries=0) as sdk:
        return raw_answer(sdk, args)


def via_shim(pool: Pool, args: dict[str, Any]) -> Answer:
    with shim_openai.OpenAI(pool=pool) as sdk:  # the SDK's defaults: max_retries=2, the pool's budget of 3
        return raw_answer(sdk, args)


def via_client(pool: Pool, args: dict[str, Any]) -> Answer:
    with pool.client() as client:
        call = client.submit("openai", "chat.completions.create", **args)
        try:
            result = call.result()
        except ProviderStatusError as exc:
            return exc.status, exc.body, dict(exc.served.headers())  # type: ignore[union-attr]
        return result.status, result.json(), dict(call.served.headers())  # type: ignore[union-attr]


def raw_answer(sdk: Any, args: dict[str, Any]) -> Answer:
    try:
        raw = sdk.chat.completions.with_raw_response.create(**args)
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.json(), isopool_headers(exc.response.headers)
    return raw.status_code, raw.parse().model_dump(), isopool_headers(raw.headers)


PATHS: dict[str, Callable[[Pool, dict[str, Any]], Answer]] = {
    "gateway-httpx": via_gateway_httpx,
    "gateway-sdk": via_gateway_sdk,
    "shim": via_shim,
    "client": via_client,
}
paths = pytest.mark.parametrize("path", list(PATHS))


def ask(fake, pool: Pool, path: str, model: str, prompt: str) -> tuple[Answer, int, float]:
    """One call on `path` against a fresh fake: its answer, the attempts that reached the fake, seconds taken."""
    fake.reset()
    started = time.monotonic()
    answer = PATHS[path](pool, openai_args(f"{prompt} via {path}", model=model))
    took = time.monotonic() - started
    return answer, sum(len(times) for times in fake.stats()["arrivals"].values()), took


@paths
def test_a_provider_down_for_good_is_answered_by_the_fallback_within_the_budget(fake, pool, path):
    (status, body, served), attempts, _ = ask(fake, pool, path, DOWN, "down")
    assert status == 200, body
    assert body["model"] == "gpt-fake"  # the answering model, in the answer itself
    assert attempts == MAX_ATTEMPTS  # two on the primary, one on the fallback: no more, through the shim too
    assert served == {"x-isopool-profile": "backup", "x-isopool-model": "gpt-fake",
                      "x-isopool-attempts": str(MAX_ATTEMPTS), "x-isopool-rescue": "fallback"}  # fmt: skip


def test_the_primarys_error_after_a_failed_fallback_says_it_came_from_the_primary(fake, pool):
    """Both targets down: the caller gets its own target's error (the real cause), and the headers name
    that target, not the fallback tried last (found by the issue-18 verification)."""
    fake.reset()
    response = httpx.post(pool.http_url + "/v1/chat/completions", json=openai_args("both down"), timeout=60,
                          headers={FAULT_HEADER: "unavailable:for=600"})  # fmt: skip
    assert response.status_code == 503 and "unavailable" in response.text
    assert isopool_headers(response.headers) == {"x-isopool-profile": "openai", "x-isopool-model": "gpt-fake",
                                                 "x-isopool-attempts": str(MAX_ATTEMPTS)}  # fmt: skip


def test_an_empty_fallbacks_list_in_the_request_turns_the_configured_chain_off(fake, pool):
    fake.reset()
    response = httpx.post(pool.http_url + "/v1/chat/completions", timeout=60,
                          json={**openai_args("no fallbacks for me", model=DOWN), "fallbacks": []})  # fmt: skip
    assert response.status_code == 503
    own = {"x-isopool-profile": "openai", "x-isopool-model": DOWN, "x-isopool-rescue": "retry"}
    assert isopool_headers(response.headers) == {**own, "x-isopool-attempts": str(MAX_ATTEMPTS)}


@paths
def test_a_silent_provider_falls_back_after_one_headers_timeout(fake, pool, path):
    (status, body, served), attempts, took = ask(fake, pool, path, "gpt-fake@no-headers:times=99", "silent")
    assert status == 200, body
    assert attempts == 2 and served["x-isopool-profile"] == "backup"
    assert took < 2 * HEADERS_TIMEOUT + 1.0  # one headers_timeout, not a second one, nor first_event_timeout


@paths
def test_context_length_goes_to_the_named_larger_model(fake, pool, path):
    (status, body, served), attempts, _ = ask(fake, pool, path, "gpt-fake@context-length:times=9", "too long")
    assert status == 200, body
    assert body["model"] == "gpt-fake-1m" and attempts == 2
    assert served["x-isopool-rescue"] == "context-fallback" and served["x-isopool-profile"] == "openai"


@paths
def test_a_content_filter_is_never_rerouted(fake, pool, path):
    (status, body, served), attempts, _ = ask(fake, pool, path, "gpt-fake@content-filter:times=9", "filtered")
    assert status == 400 and body["error"]["code"] == "content_filter"
    assert attempts == 1  # neither retried nor sent to the fallback
    assert served["x-isopool-profile"] == "openai" and "x-isopool-rescue" not in served


def test_usage_is_the_answering_attempts_only(fake, pool):
    (status, body, _), attempts, _ = ask(fake, pool, "gateway-httpx", "gpt-fake@context-length:times=9", "usage")
    assert status == 200 and attempts == 2
    direct = httpx.post(fake.url + "/v1/chat/completions", json=openai_args("usage via gateway-httpx",
                        model="gpt-fake-1m"), timeout=30).json()  # fmt: skip
    assert body["usage"] == direct["usage"]  # the fallback's own, nothing of the refused attempt added


def test_a_batch_on_a_provider_down_for_good_is_answered_by_the_fallback(fake, pool, tmp_path):
    fake.reset()
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": openai_args(f"batch {i}", model=DOWN)} for i in range(3)]  # fmt: skip
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_batch(str(source), str(tmp_path / "out.jsonl"), pool=pool)
    results = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert sorted(r["custom_id"] for r in results) == ["r0", "r1", "r2"]
    assert {r["response"]["status_code"] for r in results} == {200}
    assert {r["response"]["body"]["model"] for r in results} == {"gpt-fake"}
    assert sum(len(t) for t in fake.stats()["arrivals"].values()) == 3 * MAX_ATTEMPTS


def test_fallbacks_and_rescues_are_counted(fake, pool):
    with pool.client() as client:
        before = client.snapshot()
        ask(fake, pool, "client", DOWN, "counted")
        after = client.snapshot()
    moved = "openai>backup/gpt-fake"  # from the call's own target (its own model unnamed) to the configured one
    assert after.fallbacks[moved] == before.fallbacks.get(moved, 0) + 1
    assert after.rescued["fallback"] == before.rescued.get("fallback", 0) + 1


def test_a_stream_answered_by_the_fallback_says_so_in_its_headers(fake, pool):
    fake.reset()
    args = openai_args("a stream, down", model=DOWN, stream=True)
    response = httpx.post(pool.http_url + "/v1/chat/completions", json=args, timeout=60)
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    assert isopool_headers(response.headers)["x-isopool-profile"] == "backup"
    assert '"model":"gpt-fake"' in response.text.replace(" ", "")


def test_a_shim_error_says_where_the_call_ran(fake, pool):
    fake.reset()
    with shim_openai.OpenAI(pool=pool, pool_profile="backup") as sdk:  # no fallbacks there
        with pytest.raises(openai.APIConnectionError) as caught:
            sdk.chat.completions.create(**openai_args("reset", model="gpt-fake@reset:after=0,times=99"))
    cause = caught.value.__cause__  # the transport's error, which the SDK wraps
    assert (cause.pool_profile, cause.pool_attempts) == ("backup", MAX_ATTEMPTS)  # type: ignore[union-attr]


def test_anthropics_prompt_too_long_goes_to_the_named_model_through_the_shim(fake, pool):
    fake.reset()
    with shim_anthropic.Anthropic(pool=pool) as sdk:
        raw = sdk.messages.with_raw_response.create(**anthropic_args("long", model="claude-fake@context-length"))
    assert raw.parse().model == "claude-fake-1m" and raw.headers["x-isopool-rescue"] == "context-fallback"


@pytest.mark.parametrize(
    "status, body, failure",
    [
        (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 9 > 5"}},
         "context_length"),
        (400, {"error": {"message": "Your input exceeds the context window of this model.", "code": None}},
         "context_length"),
        (400, {"error": {"message": "...", "code": "context_length_exceeded"}}, "context_length"),
        (400, {"error": {"message": "filtered", "code": "content_filter"}}, "content_filter"),
        (400, {"error": {"message": "flagged", "code": "invalid_prompt"}}, "content_filter"),
        (400, {"error": {"message": "bad param", "code": "invalid_value"}}, ""),
        (413, {"error": {"message": "prompt is too long"}}, ""),
        (400, ["not", "an", "object"], ""),
    ],
)  # fmt: skip
def test_the_worker_reads_what_a_refusal_says_from_its_body(status, body, failure):
    assert failure_of(status, json.dumps(body).encode()) == failure


def test_the_pools_own_error_through_the_gateway_says_where_the_call_ran(fake, pool):
    fake.reset()
    args = openai_args("silent, no fallback", model="gpt-fake@no-headers:times=99")
    response = httpx.post(pool.http_url + "/v1/chat/completions", json=args, headers={"x-isopool-profile": "backup"},
                          timeout=60)  # fmt: skip
    assert response.status_code == 504  # retried once (silence), then the pool's AttemptsExhausted
    served = {"x-isopool-profile": "backup", "x-isopool-attempts": "2", "x-isopool-model": args["model"],
              "x-isopool-rescue": "retry"}  # fmt: skip
    assert isopool_headers(response.headers) == served
    assert "backup:headers_timeout, backup:headers_timeout" in response.json()["error"]["message"]


def test_the_fallback_pairs_counted_are_bounded_though_callers_name_the_models():
    stats = Stats()
    for i in range(MAX_FALLBACK_PAIRS + 50):
        stats.moved(f"anthropic/model-{i}", "backup/claude-fake")
    stats.moved("anthropic/model-0", "backup/claude-fake")
    assert len(stats.fallbacks) == MAX_FALLBACK_PAIRS + 1
    assert stats.fallbacks["(other pairs)"] == 50 and stats.fallbacks["anthropic/model-0>backup/claude-fake"] == 2
