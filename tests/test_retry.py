"""One retry policy, in the pool, for every path: the low-level client, the gateway (a plain HTTP
client, an SDK at max_retries=0 and one at its defaults) and the shim (its SDK at its defaults). Attempts are counted
where they land, at the fake provider, with their arrival times: retryable failures are retried
within the call's one budget, Retry-After is honoured up to retry_after_max, a silent provider
is retried once, a 4xx never, and the SDK's retries never multiply the pool's."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx2 as httpx  # the SDKs' own HTTP client: installed with them (httpx is only in an extra)
import openai
import pytest

from broker import Pool
from broker.errors import RequestError
from broker.fake_provider import FAULT_HEADER, FakeProviderProcess
from broker.shim import openai as shim_openai

from .conftest import TEST_SETTINGS, openai_args, profiles

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

HEADERS_TIMEOUT = 1.0
RETRY_AFTER_MAX = 5.0
MAX_ATTEMPTS = 3  # the pool's, and the shim's from its SDK's default max_retries=2


@pytest.fixture(scope="module")
def pool(fake):
    settings = dict(
        TEST_SETTINGS,
        http="127.0.0.1:0",
        headers_timeout=HEADERS_TIMEOUT,
        retry_after_max=RETRY_AFTER_MAX,
        max_attempts=MAX_ATTEMPTS,
        http_retry_backoff=0.2,
    )
    with Pool(profiles=profiles(fake.url, min_workers=2, max_workers=4), **settings) as p:
        yield p


Outcome = tuple[int, Any]  # (HTTP status, JSON body); status 0 with the pool's error name when no HTTP answer


def via_client(pool: Pool, args: dict[str, Any], spec: str) -> Outcome:
    with pool.client() as client:
        try:
            result = client.request("openai", "chat.completions.create", **args, extra_headers={FAULT_HEADER: spec})
        except RequestError as exc:
            info = exc.info
            return (info.status, exc.body) if info.status else (0, type(exc).__name__)  # type: ignore[attr-defined]
    return result.status, result.json()


def via_gateway_httpx(pool: Pool, args: dict[str, Any], spec: str) -> Outcome:
    response = httpx.post(pool.http_url + "/v1/chat/completions", json=args, headers={FAULT_HEADER: spec}, timeout=60)
    return response.status_code, response.json()


def via_gateway_sdk(pool: Pool, args: dict[str, Any], spec: str) -> Outcome:
    with openai.OpenAI(base_url=pool.http_url + "/v1", max_retries=0) as sdk:
        return _sdk_outcome(sdk, args, spec)


def via_gateway_sdk_defaults(pool: Pool, args: dict[str, Any], spec: str) -> Outcome:
    with openai.OpenAI(base_url=pool.http_url + "/v1") as sdk:  # max_retries=2: `x-should-retry: false` stops them
        return _sdk_outcome(sdk, args, spec)


def via_shim(pool: Pool, args: dict[str, Any], spec: str) -> Outcome:
    with shim_openai.OpenAI(pool=pool) as sdk:  # the SDK's defaults: max_retries=2
        return _sdk_outcome(sdk, args, spec)


def _sdk_outcome(sdk: Any, args: dict[str, Any], spec: str) -> Outcome:
    try:
        completion = sdk.chat.completions.create(**args, extra_headers={FAULT_HEADER: spec})
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.json()
    except openai.APIConnectionError as exc:
        return 0, type(exc).__name__
    if args.get("stream"):
        return 200, [chunk.model_dump() for chunk in completion]
    return 200, completion.model_dump()


PATHS: dict[str, Callable[[Pool, dict[str, Any], str], Outcome]] = {
    "client": via_client,
    "gateway-httpx": via_gateway_httpx,
    "gateway-sdk": via_gateway_sdk,
    "gateway-sdk-defaults": via_gateway_sdk_defaults,
    "shim": via_shim,
}
paths = pytest.mark.parametrize("path", list(PATHS))


def attempt(
    fake: FakeProviderProcess, pool: Pool, path: str, spec: str, prompt: str, **extra: Any
) -> tuple[Outcome, list, float]:
    """Run one call on `path` against a fresh fake; (its outcome, arrival times at the fake, seconds
    taken). Every attempt after the first must have been the pool's: counted in its retries."""
    fake.reset()
    with pool.client() as client:
        before = sum(client.snapshot().retries_by_reason.values())
        started = time.monotonic()
        outcome = PATHS[path](pool, openai_args(f"{prompt} via {path}", **extra), spec)
        took = time.monotonic() - started
        retried = sum(client.snapshot().retries_by_reason.values()) - before
    arrivals = list(fake.stats()["arrivals"].values())
    assert len(arrivals) <= 1, "one call, one distinct body"
    times = arrivals[0] if arrivals else []
    assert retried == len(times) - 1, f"{len(times)} attempts at the provider, {retried} retries by the pool"
    return outcome, times, took


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


@paths
def test_429_with_retry_after_is_retried_after_it(fake, pool, path):
    (status, body), times, _ = attempt(fake, pool, path, "http-429:retry_after=1", "rate limited once")
    assert status == 200, body
    assert len(times) == 2
    assert gaps(times)[0] >= 0.95  # the provider's Retry-After, not the backoff


@paths
def test_500_once_is_retried(fake, pool, path):
    (status, body), times, _ = attempt(fake, pool, path, "http-500", "server error once")
    assert status == 200, body
    assert len(times) == 2


@pytest.mark.parametrize("path", ["gateway-httpx", "shim"])
@pytest.mark.parametrize("spec", ["http-408", "http-409", "http-400:should_retry=true"])
def test_what_the_sdks_retry_the_pool_retries(fake, pool, path, spec):
    """408, 409 and `x-should-retry: true` on any status: the SDKs retry them, so the pool, which
    takes over their retries (the shim's SDK and the gateway's caller may have max_retries=0), does."""
    (status, body), times, _ = attempt(fake, pool, path, spec, f"{spec} once")
    assert status == 200, body
    assert len(times) == 2


@pytest.mark.parametrize("path", ["gateway-httpx", "shim"])
def test_x_should_retry_false_stops_even_a_409(fake, pool, path):
    (status, body), times, _ = attempt(fake, pool, path, "http-409:should_retry=false", "409 not to be retried")
    assert status == 409 and body["error"]["message"] == "injected http-409"
    assert len(times) == 1


def test_500_once_is_retried_before_a_stream_through_the_gateway(fake, pool):
    (status, chunks), times, _ = attempt(fake, pool, "gateway-sdk", "http-500", "stream after a 500", stream=True)
    assert status == 200 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(times) == 2


@paths
def test_connection_lost_every_time_is_retried_within_the_budget(fake, pool, path):
    (status, body), times, _ = attempt(fake, pool, path, "reset:after=0,times=99", "connection reset")
    assert status in (0, 502), body  # the SDK's connection error; the gateway's 502
    assert len(times) == MAX_ATTEMPTS  # through the shim too: not its SDK's 3 x the pool's 3


@paths
def test_provider_down_longer_than_the_budget_gets_its_503_after_exactly_the_budget(fake, pool, path):
    (status, body), times, _ = attempt(fake, pool, path, "unavailable:for=60", "down for a minute")
    assert status == 503, body  # the provider's own answer, not the pool's
    assert len(times) == MAX_ATTEMPTS  # through the shim and an SDK at its defaults too: not 3 x 3
    assert all(gap >= 0.1 for gap in gaps(times))  # backed off, never hammered


@paths
def test_silent_provider_is_retried_once_within_its_headers_timeout(fake, pool, path):
    (status, body), times, took = attempt(fake, pool, path, "no-headers:times=9", "never answers")
    assert status in (0, 504) and status != 200, body
    assert len(times) == 2
    assert took < 2 * HEADERS_TIMEOUT + 2.0  # not first_event_timeout (20 s here), nor three attempts


@paths
def test_context_length_400_is_never_retried_and_comes_back_as_it_was(fake, pool, path):
    (status, body), times, _ = attempt(fake, pool, path, "context-length:times=9", "too long")
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    assert len(times) == 1


@paths
def test_retry_after_over_the_cap_ends_the_call_at_once_with_the_429(fake, pool, path):
    (status, body), times, took = attempt(fake, pool, path, "http-429:retry_after=30,times=9", "come back later")
    assert status == 429, body
    assert len(times) == 1
    assert took < 5.0  # neither the 30 s asked for, nor the cap of 5 s waited out


def test_retries_are_counted_by_reason(fake, pool):
    with pool.client() as client:
        before = client.snapshot().retries_by_reason
        attempt(fake, pool, "client", "http-500", "counted")
        after = client.snapshot().retries_by_reason
    assert after.get("http_5xx", 0) == before.get("http_5xx", 0) + 1


def test_a_retry_waiting_out_its_retry_after_holds_up_none_of_its_callers_other_calls(fake, pool):
    fake.reset()
    with pool.client() as client:
        throttled = client.submit("openai", "chat.completions.create", **openai_args("throttled"),
                                  extra_headers={FAULT_HEADER: "http-429:retry_after=3"})  # fmt: skip
        time.sleep(0.5)  # its first attempt has been answered 429 and it waits out the 3 s
        started = time.monotonic()
        assert client.request("openai", "chat.completions.create", **openai_args("meanwhile")).status == 200
        assert time.monotonic() - started < 2.0  # not behind the throttled one in the same connection's line
        assert throttled.result().status == 200


def test_the_shims_max_retries_is_its_calls_budget_in_the_pool(fake, pool):
    """Given to the constructor or to with_options/copy, 0 included: the SDK's copy passes the client's own
    max_retries (0 in a shim client: the pool retries) where none is given, and a given 0 was taken for none."""
    fake.reset()
    with shim_openai.OpenAI(pool=pool, max_retries=0) as none, none.with_options(max_retries=3) as four, \
            shim_openai.OpenAI(pool=pool) as default:  # fmt: skip
        copies = (default.with_options(max_retries=0), default.copy(max_retries=0), default.with_options(timeout=30))
        assert none.max_retries == four.max_retries == 0  # the SDK itself never retries: the pool does
        for sdk, attempts in ((none, 1), (four, 4), *zip(copies, (1, 1, 3), strict=True)):
            fake.reset()
            assert _sdk_outcome(sdk, openai_args(f"{attempts} attempts"), "unavailable:for=60")[0] == 503
            assert [len(t) for t in fake.stats()["arrivals"].values()] == [attempts]
