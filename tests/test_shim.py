"""The drop-in shim: the same scenario once with the real SDK client pointed at the fake
provider and once with the shim's client running through the pool; results and
exceptions must match."""

from __future__ import annotations

import asyncio

import anthropic
import openai
import pytest

from broker import Pool
from broker.shim import AsyncAnthropic, AsyncOpenAI
from broker.shim import anthropic as shim_anthropic
from broker.shim import openai as shim_openai

from .conftest import TEST_SETTINGS, fault, profiles

MSG = dict(model="claude-fake", max_tokens=32, messages=[{"role": "user", "content": "shim hello"}])
CHAT = dict(model="gpt-fake", messages=[{"role": "user", "content": "shim hello"}])


@pytest.fixture(scope="module")
def pool(fake):
    """A pool with short stall limits: the shim has no per-call limits yet."""
    settings = dict(TEST_SETTINGS, first_event_timeout=1.0, stale_timeout=0.5)
    with Pool(profiles=profiles(fake.url, min_workers=1), **settings) as p:
        yield p


@pytest.fixture(scope="module")
def sdk(fake):
    return anthropic.Anthropic(base_url=fake.url), openai.OpenAI(base_url=fake.url + "/v1")


@pytest.fixture(scope="module")
def shim(pool):
    return shim_anthropic.Anthropic(pool=pool), shim_openai.OpenAI(pool=pool)


def same(a, b) -> bool:
    drop = {"id", "created", "created_at"}
    return type(a) is type(b) and a.model_dump(exclude=drop) == b.model_dump(exclude=drop)


def test_shim_clients_are_the_sdks_own_classes(shim):
    assert isinstance(shim[0], anthropic.Anthropic) and isinstance(shim[1], openai.OpenAI)
    assert shim_anthropic.RateLimitError is anthropic.RateLimitError and shim_openai.NOT_GIVEN is openai.NOT_GIVEN


def test_anthropic_create_count_tokens_and_stream_match_the_sdk(sdk, shim):
    assert same(sdk[0].messages.create(**MSG), shim[0].messages.create(**MSG))
    count = dict(model=MSG["model"], messages=MSG["messages"])
    assert same(sdk[0].messages.count_tokens(**count), shim[0].messages.count_tokens(**count))
    direct = [e.model_dump() for e in sdk[0].messages.create(stream=True, **MSG)]
    pooled = [e.model_dump() for e in shim[0].messages.create(stream=True, **MSG)]
    assert [e["type"] for e in direct] == [e["type"] for e in pooled] and len(pooled) > 5
    with sdk[0].messages.stream(**MSG) as a, shim[0].messages.stream(**MSG) as b:
        assert "".join(a.text_stream) == "".join(b.text_stream)
        assert same(a.get_final_message(), b.get_final_message())
    raw = shim[0].messages.with_raw_response.create(**MSG)
    assert raw.headers["content-type"] == "application/json" and raw.parse().stop_reason == "end_turn"


def test_openai_chat_and_responses_match_the_sdk(sdk, shim):
    assert same(sdk[1].chat.completions.create(**CHAT), shim[1].chat.completions.create(**CHAT))
    opts = dict(stream=True, stream_options={"include_usage": True}, **CHAT)
    direct = [c.model_dump(exclude={"id", "created"}) for c in sdk[1].chat.completions.create(**opts)]
    pooled = [c.model_dump(exclude={"id", "created"}) for c in shim[1].chat.completions.create(**opts)]
    assert direct == pooled
    resp = dict(model="gpt-fake", input="shim hello")
    assert sdk[1].responses.create(**resp).output_text == shim[1].responses.create(**resp).output_text


@pytest.mark.parametrize(
    ("spec", "exc"),
    [("http-429:retry_after=0,times=9", anthropic.RateLimitError), ("http-529:times=9", anthropic.OverloadedError)],
)
def test_provider_errors_raise_the_sdks_classes(sdk, shim, spec, exc):
    for client in (sdk[0].with_options(max_retries=0), shim[0].with_options(max_retries=0)):
        with pytest.raises(exc) as caught:
            client.messages.create(**MSG, **fault(spec))
        assert caught.value.status_code in (429, 529)


def test_async_clients_and_a_seen_stall_raise_the_sdks_timeout_error(pool, fake):
    async def scenario():
        client = AsyncAnthropic(pool=pool)
        direct = anthropic.AsyncAnthropic(base_url=fake.url)
        assert same(await direct.messages.create(**MSG), await client.messages.create(**MSG))
        async with AsyncOpenAI(pool=pool) as oai:
            chat = await oai.chat.completions.create(**CHAT)
        assert chat.choices[0].finish_reason == "stop"
        stream = await client.messages.create(
            stream=True, **MSG, **fault("stall-ping:after=3,interval=0.05")
        )  # fmt: skip
        seen = 0
        with pytest.raises(anthropic.APITimeoutError) as caught:
            async for _ in stream:
                seen += 1
        assert seen >= 1 and caught.value.delivered >= 1
        await client.close()
        await direct.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_unseen_stall_is_invisible_through_the_shim(sdk, shim):
    args = dict(MSG, messages=[{"role": "user", "content": "shim unseen stall"}])
    faulted = shim[0].messages.create(**args, **fault("stall-first:interval=0.05"), timeout=60)
    assert same(faulted, sdk[0].messages.create(**args))


def test_base_url_override_is_a_clear_error_at_construction(pool):
    with pytest.raises(ValueError, match="profile"):
        shim_anthropic.Anthropic(pool=pool, base_url="http://elsewhere.example")
