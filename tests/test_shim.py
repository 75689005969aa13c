"""The drop-in shim: each scenario runs once with the real SDK client pointed at the fake
provider and once with the shim's client through the pool; results and exceptions must
match. Then the pool's faults (F1-F8) as code written for the SDKs sees them."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import anthropic
import openai
import pydantic
import pytest

from broker import BadRequest, Pool
from broker.protocol import HttpCall
from broker.sdklib import library
from broker.shim import anthropic as shim_anthropic
from broker.shim import openai as shim_openai

from .conftest import TEST_SETTINGS, fault, fault_kills, profiles, sdk_has, wait_for

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

# What the oldest supported SDKs lack (conftest's RELEASES) is compared from the release that has it.
COUNT_TOKENS, RESPONSES, CHAT_PARSE = (
    sdk_has("messages.count_tokens"),
    sdk_has("responses"),
    sdk_has("chat.completions.parse"),
)
OVERLOADED = anthropic.OverloadedError if sdk_has("OverloadedError") else anthropic.InternalServerError

MSG = dict(model="claude-fake", max_tokens=32, messages=[{"role": "user", "content": "shim hello"}])
CHAT = dict(model="gpt-fake", messages=[{"role": "user", "content": "shim hello"}])
VOLATILE = {"id", "created", "created_at"}


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_TOOL["input_schema"]}}


class Weather(pydantic.BaseModel):
    city: str
    degrees: int
    sunny: bool


@pytest.fixture(scope="module")
def pool(fake):
    """Short stall limits, so that faults are caught in well under a second."""
    settings = dict(TEST_SETTINGS, first_event_timeout=1.0, stale_timeout=0.5)
    with Pool(profiles=profiles(fake.url, min_workers=1), **settings) as p:
        yield p


@pytest.fixture(scope="module")
def pair(fake, pool):
    """(direct SDK clients, shim clients), sync."""
    direct = anthropic.Anthropic(base_url=fake.url), openai.OpenAI(base_url=fake.url + "/v1")
    shim = shim_anthropic.Anthropic(pool=pool), shim_openai.OpenAI(pool=pool)
    yield direct, shim
    for client in (*direct, *shim):
        client.close()


def plain(value):
    """A comparable form of an SDK result: models dumped, volatile ids dropped."""
    if isinstance(value, pydantic.BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def anthropic_scenarios(c):
    count = dict(model=MSG["model"], messages=MSG["messages"])
    yield "create", c.messages.create(**MSG)
    yield "stream", list(c.messages.create(stream=True, **MSG))
    with c.messages.stream(**MSG) as stream:
        yield "helper", ("".join(stream.text_stream), stream.get_final_message())
    if COUNT_TOKENS:
        yield "count_tokens", c.messages.count_tokens(**count)
    yield "beta.create", c.beta.messages.create(**MSG)
    yield "beta.count_tokens", c.beta.messages.count_tokens(**count)
    raw = c.messages.with_raw_response.create(**MSG)
    yield "raw", (raw.status_code, raw.headers["content-type"], raw.parse())
    with c.messages.with_streaming_response.create(**MSG) as resp:
        yield "streaming_response", (resp.status_code, resp.parse())
    call = c.messages.create(tools=[WEATHER_TOOL], **MSG)
    yield "tool_use", call
    yield "tool_use.stream", list(c.messages.create(tools=[WEATHER_TOOL], stream=True, **MSG))
    result = {"type": "tool_result", "tool_use_id": call.content[0].id, "content": "sunny"}
    turns = [*MSG["messages"], {"role": "assistant", "content": call.content}, {"role": "user", "content": [result]}]
    yield "tool_result", c.messages.create(tools=[WEATHER_TOOL], **{**MSG, "messages": turns})
    extras = dict(extra_headers={"x-trace": "1"}, extra_query={"trace": "1"}, extra_body={"metadata": {"user_id": "u"}})
    yield "extras", c.messages.create(stop_sequences=anthropic.NOT_GIVEN, **extras, **MSG)


def openai_scenarios(c):
    yield "chat", c.chat.completions.create(**CHAT)
    yield "chat.stream", list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **CHAT))
    parse = c.chat.completions.parse if CHAT_PARSE else c.beta.chat.completions.parse
    yield "chat.parse", parse(response_format=Weather, **CHAT).choices[0].message.parsed
    if RESPONSES:
        yield "responses", c.responses.create(model="gpt-fake", input="shim hello").output_text
        stream = c.responses.create(model="gpt-fake", input="shim hello", stream=True)
        yield "responses.stream", [e.type for e in stream]
    yield "tool_calls", c.chat.completions.create(tools=[CHAT_TOOL], **CHAT)
    yield "tool_calls.stream", list(c.chat.completions.create(tools=[CHAT_TOOL], stream=True, **CHAT))
    if RESPONSES:
        fn = {"type": "function", **{k: CHAT_TOOL["function"][k] for k in ("name", "parameters")}}
        yield "responses.function_call", c.responses.create(model="gpt-fake", input="weather?", tools=[fn]).output
    raw = c.chat.completions.with_raw_response.create(**CHAT)
    yield "raw", (raw.headers["content-type"], raw.parse())
    with c.chat.completions.with_streaming_response.create(**CHAT) as resp:
        yield "streaming_response", resp.parse()


@pytest.mark.parametrize("scenarios", [anthropic_scenarios, openai_scenarios], ids=["anthropic", "openai"])
def test_sync_shim_matches_the_sdk(pair, scenarios):
    direct, shim = pair
    which = 0 if scenarios is anthropic_scenarios else 1
    expected = list(scenarios(direct[which]))
    got = list(scenarios(shim[which]))
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (name, want), (_, have) in zip(expected, got, strict=True):
        assert plain(have) == plain(want), name


async def anthropic_async_scenarios(c):
    yield "create", await c.messages.create(**MSG)
    yield "stream", [e async for e in await c.messages.create(stream=True, **MSG)]
    async with c.messages.stream(**MSG) as stream:
        yield "helper", ("".join([t async for t in stream.text_stream]), await stream.get_final_message())
    if COUNT_TOKENS:
        yield "count_tokens", await c.messages.count_tokens(model=MSG["model"], messages=MSG["messages"])
    raw = await c.messages.with_raw_response.create(**MSG)
    parsed = raw.parse()  # a coroutine from anthropic 1.0 on, as in the SDK
    yield "raw", (raw.status_code, await parsed if inspect.isawaitable(parsed) else parsed)
    async with c.messages.with_streaming_response.create(**MSG) as resp:
        yield "streaming_response", (resp.status_code, await resp.parse())
    yield "beta.create", await c.beta.messages.create(**MSG)
    yield "tool_use", await c.messages.create(tools=[WEATHER_TOOL], **MSG)


async def openai_async_scenarios(c):
    yield "chat", await c.chat.completions.create(**CHAT)
    yield "chat.stream", [x async for x in await c.chat.completions.create(stream=True, **CHAT)]
    parsed = await (c.chat.completions.parse if CHAT_PARSE else c.beta.chat.completions.parse)(
        response_format=Weather, **CHAT
    )
    yield "chat.parse", parsed.choices[0].message.parsed
    if RESPONSES:
        yield "responses", (await c.responses.create(model="gpt-fake", input="shim hello")).output_text
    raw = await c.chat.completions.with_raw_response.create(**CHAT)
    yield "raw", raw.parse()  # synchronous, as in the SDK
    async with c.chat.completions.with_streaming_response.create(**CHAT) as resp:
        yield "streaming_response", await resp.parse()
    if RESPONSES:
        stream = await c.responses.create(model="gpt-fake", input="shim hello", stream=True)
        yield "responses.stream", [e.type async for e in stream]
    yield "tool_calls", await c.chat.completions.create(tools=[CHAT_TOOL], **CHAT)


def test_async_shim_matches_the_sdk(fake, pool):
    async def run(scenarios, client):
        async with client:
            return [(name, plain(value)) async for name, value in scenarios(client)]

    async def main():
        for scenarios, sdk_cls, shim_cls, url in [
            (anthropic_async_scenarios, anthropic.AsyncAnthropic, shim_anthropic.AsyncAnthropic, fake.url),
            (openai_async_scenarios, openai.AsyncOpenAI, shim_openai.AsyncOpenAI, fake.url + "/v1"),
        ]:
            expected = await run(scenarios, sdk_cls(base_url=url))
            assert await run(scenarios, shim_cls(pool=pool)) == expected

    asyncio.run(asyncio.wait_for(main(), 120))


def test_shim_clients_are_the_sdks_own_classes_and_carry_request_ids(pair):
    _, (claude, gpt) = pair
    assert isinstance(claude, anthropic.Anthropic) and isinstance(gpt, openai.OpenAI)
    assert shim_anthropic.RateLimitError is anthropic.RateLimitError and shim_openai.NOT_GIVEN is openai.NOT_GIVEN
    assert claude.messages.create(**MSG)._request_id.startswith("req_fake_")
    if sdk_has("_request_id"):
        assert gpt.chat.completions.create(**CHAT)._request_id.startswith("req_fake_")
    stream = claude.messages.create(stream=True, **MSG)
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    stream.close()


@pytest.mark.parametrize(
    ("spec", "exc"),
    [
        ("http-429:retry_after=0,times=9", anthropic.RateLimitError),
        ("http-529:times=9", OVERLOADED),
        ("http-500:times=9", anthropic.InternalServerError),
    ],
)
def test_f7_provider_errors_raise_the_sdks_classes_with_its_retries(pair, fake, spec, exc):
    direct, shim = pair
    for client in (direct[0], shim[0]):
        served = sum(fake.stats()["served"].values())
        with pytest.raises(exc) as caught:
            client.with_options(max_retries=1).messages.create(**MSG, **fault(spec))
        assert caught.value.status_code == int(spec[5:8]) and caught.value.request_id.startswith("req_fake_")
        assert sum(fake.stats()["served"].values()) - served == 2  # the SDK's own retry setting applies


def test_f7_mid_stream_error_event_raises_the_sdks_class(pair):
    direct, shim = pair
    for client in (direct[0], shim[0]):
        with pytest.raises(anthropic.APIStatusError):
            list(client.messages.create(stream=True, **MSG, **fault("error-event:after=3,times=2")))


UNSEEN = ["stall-first:interval=0.05", "stall-ping:after=3,interval=0.05", "stall-comment:after=3,interval=0.05",
          "silent:after=3", "reset:after=3"]  # fmt: skip


@pytest.mark.parametrize("spec", UNSEEN, ids=["F1", "F2", "F3", "F4", "F6"])
def test_f1_to_f6_unseen_faults_are_invisible(pair, spec):
    direct, shim = pair
    args = dict(MSG, messages=[{"role": "user", "content": f"unseen {spec}"}])
    assert plain(shim[0].messages.create(**args, **fault(spec))) == plain(direct[0].messages.create(**args))
    chat = dict(CHAT, messages=[{"role": "user", "content": f"unseen {spec}"}])
    assert plain(shim[1].chat.completions.create(**chat, **fault(spec))) == plain(
        direct[1].chat.completions.create(**chat)
    )


@pytest.mark.parametrize(
    ("spec", "exc", "pool_exc"),
    [
        ("stall-ping:after=3,interval=0.05", anthropic.APITimeoutError, shim_anthropic.APITimeoutError),
        ("reset:after=3", anthropic.APIConnectionError, shim_anthropic.APIConnectionError),
    ],
    ids=["F2-seen", "F6-seen"],
)
def test_seen_stream_failures_raise_the_sdks_error_classes(pair, spec, exc, pool_exc):
    _, (claude, gpt) = pair
    seen = 0
    with pytest.raises(exc) as caught:
        for _ in claude.messages.create(stream=True, **MSG, **fault(spec)):
            seen += 1
    assert isinstance(caught.value, pool_exc) and seen >= 2 and caught.value.delivered >= seen
    assert caught.value.pool_request_id
    with pytest.raises(openai.APIConnectionError):
        list(gpt.chat.completions.create(stream=True, **CHAT, **fault(spec)))


def test_f5_slow_healthy_drip_is_not_killed(pair, pool):
    _, (claude, _) = pair
    with pool.client() as c:
        before = fault_kills(c)
        events = list(claude.messages.create(stream=True, **MSG, **fault("drip:gap=0.2")))
        assert events[-1].type == "message_stop"
        assert fault_kills(c) == before


def test_hung_anthropic_stream_with_pings_is_recovered_for_async_callers(fake, pool):
    """The field case: `event: ping` every second and nothing else, called with stream=True."""

    async def main():
        async with shim_anthropic.AsyncAnthropic(pool=pool) as client, anthropic.AsyncAnthropic(
            base_url=fake.url
        ) as direct:  # fmt: skip
            args = dict(MSG, messages=[{"role": "user", "content": "hung with pings"}])
            stream = await client.messages.create(stream=True, **args, **fault("stall-first:interval=1"))
            got = [e async for e in stream]
            want = [e async for e in await direct.messages.create(stream=True, **args)]
            assert plain(got) == plain(want)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_f8_hung_worker_is_replaced_and_the_call_answered(pair, pool):
    direct, (claude, _) = pair
    args = dict(MSG, messages=[{"role": "user", "content": "f8 through the shim"}])
    answers = []
    caller = threading.Thread(
        target=lambda: answers.append(claude.messages.create(**args, **fault("slow-first:delay=2")))
    )
    caller.start()
    with pool.client() as c:
        busy = wait_for(lambda: [w for w in c.stats()["workers"] if w["requests"]], 10, "a busy worker")
        os.kill(busy[0]["pid"], signal.SIGSTOP)
    caller.join(30)
    assert answers and plain(answers[0]) == plain(direct[0].messages.create(**args))


@pytest.mark.parametrize("name", ["transport", "proxies", "connection_pool_limits"])
def test_anthropic_0x_connection_arguments_are_ignored_with_a_warning_at_the_callers_line(pool, name):
    """anthropic 0.x's own connection settings configure a connection the pool's worker makes."""
    lib = library("anthropic")
    value = {
        "transport": lib.HTTPTransport(),
        "proxies": "http://proxy.invalid:1",
        "connection_pool_limits": lib.Limits(),
    }[name]
    with pytest.warns(UserWarning, match=f"{name}= is ignored") as caught:
        client = shim_anthropic.Anthropic(pool=pool, **{name: value})
    assert [w.filename for w in caught] == [__file__]
    assert client.messages.create(**MSG).type == "message"


def test_a_shared_pool_refuses_a_clients_own_key_or_base_url_at_construction(pool):
    for own in ({"api_key": "sk-ant-mine"}, {"base_url": "http://elsewhere.example"}):
        with pytest.raises(ValueError, match="allow_overrides"):
            shim_anthropic.Anthropic(pool=pool, **own)


def test_profile_is_the_sdks_own_and_pool_profile_the_pools(pool):
    """anthropic >= 0.125 has `profile=` (a credentials file, read in the caller): it is the client's own
    credentials, never the pool's profile, which is `pool_profile=` (issue 19)."""
    if "profile" in inspect.signature(anthropic.Anthropic.__init__).parameters:
        with pytest.raises(ValueError, match="allow_overrides"):
            shim_anthropic.Anthropic(pool=pool, profile="work")
    with pytest.raises(TypeError, match="pool_profile=NAME"):
        shim_openai.OpenAI(pool=pool, profile="openai")
    with shim_openai.OpenAI(pool=pool, pool_profile="openai") as client:
        assert client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}]).choices


def test_the_sdks_own_default_base_url_and_an_empty_key_are_the_pools(pool):
    """LangChain's ChatAnthropic builds its client with base_url="https://api.anthropic.com" and
    api_key="" when none is set: a shared pool serves it with its own profile and key."""
    with shim_anthropic.Anthropic(pool=pool, base_url="https://api.anthropic.com/", api_key="") as client:
        assert client.messages.create(**MSG).type == "message"
    with shim_openai.OpenAI(pool=pool, base_url="https://api.openai.com/v1", api_key="") as client:
        assert client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}]).choices


def test_worker_refuses_an_override_the_pool_does_not_allow_without_connecting(pool, fake):
    served = sum(fake.stats()["served"].values())
    call = HttpCall("POST", "/v1/messages", [], b"{}", base_url="http://127.0.0.1:9")
    with pool.client() as client, pytest.raises(BadRequest, match="allow_overrides"):
        client.submit_http("anthropic", call).result()
    assert sum(fake.stats()["served"].values()) == served


def test_a_pool_that_allows_overrides_uses_the_clients_own_base_url_and_key(fake):
    settings = dict(TEST_SETTINGS, allow_overrides=True)
    with Pool(profiles=profiles(fake.url, min_workers=1), **settings) as own:
        with shim_anthropic.Anthropic(pool=own, api_key="sk-ant-own") as client:
            assert client.messages.create(**MSG).type == "message"
        with shim_anthropic.Anthropic(pool=own, base_url=fake.url + "/elsewhere") as client:
            with pytest.raises(anthropic.NotFoundError):  # the request went to the client's own base_url
                client.messages.create(**MSG)


_SCRIPT = textwrap.dedent(
    """
    from broker.shim import anthropic
    client = anthropic.Anthropic()  # no pool named: an embedded one starts, owned by this process
    print(client.messages.create(model="claude-fake", max_tokens=8, messages=[{"role": "user", "content": "x"}]).type)
    """
)


def test_embedded_pool_starts_on_first_use_and_stops_at_exit(fake, own_processes):
    env = {k: v for k, v in os.environ.items() if k != "ISOPOOL_URL"} | {"ANTHROPIC_BASE_URL": fake.url}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "message"


def test_unreachable_broker_is_the_sdks_connection_error_within_the_timeout(tmp_path):
    client = shim_anthropic.Anthropic(pool=f"ipc://{tmp_path}/nobody.sock", broker_timeout=0.3, max_retries=0)
    start = time.monotonic()
    with pytest.raises(anthropic.APIConnectionError) as caught:
        client.messages.create(**MSG)
    assert time.monotonic() - start < 5
    assert "no answer from the broker" in str(caught.value.__cause__)  # the SDK keeps ours as the cause


_EXISTING_SCRIPT = textwrap.dedent(
    """
    import sys
    import anthropic

    client = anthropic.Anthropic()
    stream = client.messages.create(model="claude-fake", max_tokens=8, stream=True,
                                    messages=[{"role": "user", "content": sys.argv[1]}],
                                    extra_headers={"x-isopool-fault": "stall-first:interval=0.05"})
    print(type(client).__module__, [event.type for event in stream][-1])
    """
)


def test_isopool_run_takes_an_existing_sdk_script_through_the_pool(tmp_path, fake, own_processes):
    """The script stalls before its first event: the plain SDK would wait out its 600 s read
    timeout (pings reset it); through the pool it is retried after first_event_timeout."""
    script = tmp_path / "existing.py"
    script.write_text(_EXISTING_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "ISOPOOL_URL"}
    env |= {"ANTHROPIC_BASE_URL": fake.url, "ISOPOOL_FIRST_EVENT_TIMEOUT": "1"}
    isopool = os.path.join(os.path.dirname(sys.executable), "isopool")
    out = subprocess.run([isopool, "run", str(script), "hi"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["broker.shim", "message_stop"]


_UNROUTED_SCRIPT = textwrap.dedent(
    """
    import anthropic, openai
    from anthropic.lib.aws import AnthropicAWS

    routed = anthropic.Anthropic()
    aws = anthropic.AnthropicAWS(api_key="k", aws_region="us-east-1", workspace_id="w")
    bedrock = openai.BedrockOpenAI(api_key="k", aws_region="us-east-1")
    aws.with_options(timeout=5)  # a copy the SDK makes: warned once already
    print(type(routed).__module__, isinstance(aws, AnthropicAWS), str(aws.base_url), type(bedrock).__name__)
    """
)


@pytest.mark.skipif(
    not (hasattr(anthropic, "AnthropicAWS") and hasattr(openai, "BedrockOpenAI")),
    reason=f"AnthropicAWS, BedrockOpenAI: newer than anthropic {anthropic.__version__}, openai {openai.__version__}",
)
def test_isopool_run_warns_of_a_client_class_the_pool_does_not_route(tmp_path, pool):
    """AnthropicAWS and BedrockOpenAI are not routed yet: under `isopool run` a script's client of either
    is made as the SDK makes it (its calls go straight to the provider), with a warning saying so. Before,
    nothing told the user that this client had no stall protection."""
    script = tmp_path / "unrouted.py"
    script.write_text(_UNROUTED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ISOPOOL_URL"))}
    isopool = os.path.join(os.path.dirname(sys.executable), "isopool")
    out = subprocess.run([isopool, "run", "--pool", pool.url, str(script)], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    module, is_aws, base_url, name = out.stdout.split()
    assert (module, is_aws, name) == ("broker.shim", "True", "BedrockOpenAI") and "us-east-1" in base_url
    warned = re.findall(r"UnroutedClientWarning: (\w+) is not routed through the isopool pool", out.stderr)
    assert warned == ["AnthropicAWS", "BedrockOpenAI"], out.stderr
    assert "no stall protection" in out.stderr


_MODULE_CLIENT_SCRIPT = textwrap.dedent(
    """
    import os, pickle, openai

    openai.base_url, openai.api_key = os.environ["FAKE_URL"] + "/v1/", "sk-its-own"
    for prompt in ("module level", "again"):
        reply = openai.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": prompt}])
    kind = type(openai._client)  # pickled by name, as with a client a process pool sends (openai 1.x's cannot be)
    print(bool(reply.choices[0].message.content), type(openai.OpenAI()).__module__,
          pickle.loads(pickle.dumps(kind)) is kind)
    """
)


def test_isopool_run_warns_that_openais_module_level_client_is_not_routed(tmp_path, fake, pool):
    """`openai.chat.completions.create(...)` with no client object uses a client openai builds from a private
    class: under `isopool run` it went straight to the provider without a word. Now it warns, once, and says
    which classes the pool routes, at the script's own line; its calls are made as before, and its client
    still pickles (its class is found by name in `broker.shim`)."""
    script = tmp_path / "module_client.py"
    script.write_text(_MODULE_CLIENT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ISOPOOL_URL")} | {"FAKE_URL": fake.url}
    isopool = os.path.join(os.path.dirname(sys.executable), "isopool")
    out = subprocess.run([isopool, "run", "--pool", pool.url, str(script)], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    # answered (by the fake, directly); OpenAI() is routed
    assert out.stdout.split() == ["True", "broker.shim", "True"]
    warned = re.findall(r"module_client.py:\d+: UnroutedClientWarning: openai's module-level client .* is not routed",
                        out.stderr)  # fmt: skip
    assert len(warned) == 1 and "The pool routes" in out.stderr and "OpenAI" in out.stderr, out.stderr


def test_the_shim_leaves_openais_module_level_client_unbuilt():
    """Looking through the SDK's classes must not touch openai's lazy module attributes (`openai.chat`): asking
    one for its class built openai's module-level client, 2 s of imports, and on openai 1.40 raised
    OpenAIError without OPENAI_API_KEY (which the pool holds), so that `isopool run` of any script failed."""
    script = "import openai\nfrom broker.shim import openai as pooled\nprint(pooled.OpenAI.__module__, openai._client)"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["broker.shim", "None"]


_NO_CLIENT_YET = textwrap.dedent(
    """
    import time
    import psutil

    deadline = time.monotonic() + 30
    while not any("broker.server" in " ".join(p.cmdline()) for p in psutil.Process().children()):
        assert time.monotonic() < deadline, "no broker started"
        time.sleep(0.05)
    print("booting before any client")
    """
)


_INTERRUPTED_RUN = """
import atexit, pathlib, time
here = pathlib.Path(__file__).parent
log = open(here / "log.txt", "w")
log.write("got this far\\n")  # buffered
atexit.register(lambda: (here / "atexit.txt").write_text("ran"))
print("ready", flush=True)
time.sleep(60)
"""


def test_isopool_run_interrupted_shows_the_scripts_traceback_and_runs_its_exit_handlers(tmp_path, pool):
    """A review found the Ctrl-C handling of this session's first version killing `isopool run` before the
    script's atexit handlers ran and its buffers were flushed, with its traceback gone."""
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED_RUN)
    isopool = os.path.join(os.path.dirname(sys.executable), "isopool")
    proc = subprocess.Popen([isopool, "run", "--pool", pool.url, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert 'interrupted.py", line' in err and err.rstrip().endswith("KeyboardInterrupt"), err  # the script's
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "log.txt").read_text() == "got this far\n"


def test_isopool_run_boots_the_embedded_pool_as_the_script_starts(tmp_path, own_processes):
    """Not in the script's first client constructor: the pool boots while the script imports its SDK."""
    script = tmp_path / "no_client_yet.py"
    script.write_text(_NO_CLIENT_YET)
    env = {k: v for k, v in os.environ.items() if k != "ISOPOOL_URL"}
    isopool = os.path.join(os.path.dirname(sys.executable), "isopool")
    out = subprocess.run([isopool, "run", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "booting before any client"


def test_an_async_client_survives_being_used_from_successive_event_loops(pool):
    client = shim_anthropic.AsyncAnthropic(pool=pool)
    for _ in range(2):
        assert asyncio.run(client.messages.create(**MSG)).type == "message"


def test_per_call_timeout_caps_the_pools_stall_limits(pair):
    """A first event slower than the caller's own `timeout=`: the SDK's timeout error either way."""
    direct, shim = pair
    slow = fault("slow-first:delay=5,times=9")
    for client in (direct[0], shim[0]):
        start = time.monotonic()
        with pytest.raises(anthropic.APITimeoutError):
            client.with_options(max_retries=0).messages.create(**MSG, **slow, timeout=0.5)
        assert time.monotonic() - start < 4.5  # not the 5 s delay, nor the pool's own limits


def test_threads_sharing_a_sync_client_each_read_their_own_streams(pair):
    """One shim client, several threads streaming at once (each interleaving two streams of its own):
    every stream gets its own events, whole, as the direct SDK does."""
    direct, (claude, _) = pair
    asks = [dict(MSG, max_tokens=200, messages=[{"role": "user", "content": f"thread {n}"}]) for n in range(8)]
    want = [plain(list(direct[0].messages.create(stream=True, **ask))) for ask in asks]
    got: dict[int, object] = {}

    def read(n: int) -> None:
        first, second = (claude.messages.create(stream=True, **asks[i]) for i in (n, n + 4))
        events: tuple[list, list] = ([], [])
        for pair_of in zip(first, second, strict=False):  # the two streams read in turn on one thread
            events[0].append(pair_of[0])
            events[1].append(pair_of[1])
        events[0].extend(first)
        events[1].extend(second)
        got[n], got[n + 4] = plain(events[0]), plain(events[1])

    threads = [threading.Thread(target=read, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [got.get(n) for n in range(8)] == want


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: POSIX only")
def test_a_sync_client_made_before_fork_works_in_the_child(pair):
    """A forked child (gunicorn's preload, multiprocessing's fork) uses the shim client its parent made
    and used: its calls go through a pool connection of its own, and the parent's keeps working."""
    direct, (claude, _) = pair
    ask = dict(MSG, messages=[{"role": "user", "content": "after fork"}])
    want = plain(direct[0].messages.create(**ask))
    assert plain(claude.messages.create(**ask)) == want  # the parent's connection is in use
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            signal.alarm(20)
            answer = plain(claude.messages.create(**ask)) == want
            streamed = [e.type for e in claude.messages.create(stream=True, **ask)][-1] == "message_stop"
            os.write(writer, b"ok" if answer and streamed else b"wrong answer")
        except BaseException as exc:
            os.write(writer, repr(exc).encode()[:500])
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = pipe.read()
    os.waitpid(child, 0)
    assert report == b"ok"
    assert plain(claude.messages.create(**ask)) == want
