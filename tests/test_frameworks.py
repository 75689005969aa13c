"""Frameworks written for the SDKs run an agent turn with a tool call through the pool:
instructor with the shim's `AsyncOpenAI` (it checks `isinstance(client, openai.AsyncOpenAI)`),
LangChain's chat models through the HTTP gateway (they take a `base_url`).

These need the `frameworks` extra (`.ci/run` installs it); without it they skip."""

from __future__ import annotations

import asyncio

import pydantic
import pytest

from broker import Pool
from broker.shim import AsyncOpenAI

from .conftest import TEST_SETTINGS, fault, profiles

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

EXTRA = "needs the frameworks extra: pip install -e '.[frameworks]' && pip install --no-deps instructor (see .ci/run)"


@pytest.fixture(scope="module")
def pool(fake):
    settings = dict(TEST_SETTINGS, first_event_timeout=1.0, stale_timeout=0.5, http="127.0.0.1:0")
    with Pool(profiles=profiles(fake.url, min_workers=1), **settings) as p:
        yield p


class Weather(pydantic.BaseModel):
    city: str
    degrees: int


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def test_instructor_structured_output_through_the_shim(pool):
    instructor = pytest.importorskip("instructor", reason=EXTRA)

    async def main():
        async with AsyncOpenAI(pool=pool) as shim:
            client = instructor.from_openai(shim)
            messages = [{"role": "user", "content": "weather in Paris?"}]
            weather = await client.chat.completions.create(model="gpt-fake", response_model=Weather, messages=messages)
            assert isinstance(weather, Weather) and weather.city
            # a stall before any output is retried by the pool, invisibly to the framework
            again = await client.chat.completions.create(
                model="gpt-fake", response_model=Weather, messages=messages,
                extra_headers=fault("stall-first:interval=0.05")["extra_headers"],
            )  # fmt: skip
            assert again.model_dump() == weather.model_dump()

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_langchain_agent_turn_with_a_tool_call_through_the_gateway(pool, provider):
    messages_module = pytest.importorskip("langchain_core.messages", reason=EXTRA)
    if provider == "anthropic":
        chat_cls = pytest.importorskip("langchain_anthropic", reason=EXTRA).ChatAnthropic
        llm = chat_cls(model="claude-fake", base_url=pool.http_url, api_key="unused", max_tokens=64)
    else:
        chat_cls = pytest.importorskip("langchain_openai", reason=EXTRA).ChatOpenAI
        llm = chat_cls(model="gpt-fake", base_url=pool.http_url + "/v1", api_key="unused")
    agent = llm.bind_tools([get_weather])
    history = [messages_module.HumanMessage("What is the weather in Paris?")]
    first = agent.invoke(history)
    assert first.tool_calls and first.tool_calls[0]["name"] == "get_weather"
    call = first.tool_calls[0]
    history += [first, messages_module.ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])]
    final = agent.invoke(history)
    assert not final.tool_calls and final.text
