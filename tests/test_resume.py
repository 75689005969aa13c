"""A broken stream continued instead of lost (opt-in, `continue_streams`): a stream cut or stalled after
output is answered in full by prefill (Anthropic text) or replay-and-verify, through the low-level client,
the gateway (a plain HTTP client and an SDK at max_retries=0) and the shim, against the fake provider over
real HTTP. The caller's SDK parses one message; a replay that does not reproduce what was delivered ends
with the original typed error, never a spliced answer; every continuation is an attempt of the budget."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import anthropic
import httpx2 as httpx  # the SDKs' own HTTP client: installed with them (httpx is only in an extra)
import openai
import pytest

from broker import DeadlineExceeded, Pool, StreamIncomplete, StreamStalled
from broker.config import load_settings
from broker.errors import ConfigError
from broker.fake_provider import FAULT_HEADER
from broker.http.metrics import families
from broker.protocol import Tokens
from broker.server.resumes import strategies_for
from broker.shim import anthropic as shim_anthropic
from broker.shim import openai as shim_openai
from worker.resume import Diverged, Prefill, Replay, Seen

from .conftest import TEST_SETTINGS, anthropic_args, fault, needs_sdk, openai_args

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

STALE = 1.0  # a stall after output is noticed this soon
BOTH = ["prefill", "replay"]
TOOL = {"name": "lookup", "description": "look it up", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}  # fmt: skip


def profile(fake_url: str, kind: str, strategies: list[str], **extra: Any) -> dict[str, Any]:
    """A profile of the fake provider whose broken streams are continued by `strategies`."""
    url = fake_url + ("/v1" if kind == "openai" else "")
    return {"kind": kind, "base_url": url, "min_workers": 1, "max_workers": 3, "continue_streams": strategies,
            **extra}  # fmt: skip


@pytest.fixture(scope="module")
def pool(fake):
    profiles = {
        "anthropic": profile(fake.url, "anthropic", BOTH),
        "openai": profile(fake.url, "openai", BOTH),
        "plain": profile(fake.url, "anthropic", []),
        "plain-openai": profile(fake.url, "openai", [], min_workers=0),
        "prefill-only": profile(fake.url, "anthropic", ["prefill"], min_workers=0),
        "replay-only": profile(fake.url, "anthropic", ["replay"], min_workers=0),
        # a fallback whose streams are cut after output: a call moved there is continued there
        "primary": profile(
            fake.url, "openai", BOTH, min_workers=0, fallbacks=[{"profile": "cutting", "model": "gpt-fake"}]
        ),  # fmt: skip
        "cutting": profile(fake.url, "openai", [], min_workers=0, default_headers={FAULT_HEADER: "cut:after=3"}),
    }
    with Pool(profiles=profiles, **dict(TEST_SETTINGS, stale_timeout=STALE, http="127.0.0.1:0")) as p:
        yield p


@pytest.fixture
def client(pool):
    with pool.client() as c:
        yield c


def served(fake_url: str) -> dict[str, int]:
    return httpx.get(fake_url + "/_isopool/stats").json()["served"]


def stats(client) -> tuple[dict[str, int], dict[str, int]]:
    snapshot = client.stats()
    return snapshot["rescued"], snapshot["continuations"]


def grew(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def assert_one_message(events: list[dict[str, Any]]) -> str:
    """What a caller's SDK needs to parse one message: one start, blocks started, filled and stopped in
    order with continuous indices, one message_delta, one stop; returns the text."""
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds.count("message_start") == 1, kinds
    assert kinds[-1] == "message_stop" and kinds.count("message_stop") == 1 and kinds.count("message_delta") == 1
    starts = [e["index"] for e in events if e["type"] == "content_block_start"]
    stops = [e["index"] for e in events if e["type"] == "content_block_stop"]
    assert starts == stops == list(range(len(starts))), (starts, stops)
    assert all(e["index"] in starts for e in events if e["type"] == "content_block_delta")
    return "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")


def chat_text(chunks: list[dict[str, Any]]) -> str:
    assert sum(1 for c in chunks for ch in c["choices"] if ch["finish_reason"]) == 1
    assert sum(1 for c in chunks for ch in c["choices"] if "role" in ch["delta"]) == 1
    assert len({c["id"] for c in chunks}) == 1
    return "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])


SPECS = ["cut:after=3", "cut:after=7", "stall-ping:after=3", "stall-ping:after=7,interval=0.2"]


@pytest.mark.parametrize("spec", SPECS)
def test_anthropic_stream_broken_after_output_is_answered_whole_through_the_client(client, spec):
    args = anthropic_args(f"client {spec}", stream=True)
    clean = assert_one_message([e.json() for e in client.submit("anthropic", "messages.create", **args)])
    rescued, _ = stats(client)
    call = client.submit("anthropic", "messages.create", **args, **fault(spec))
    events = [e.json() for e in call]
    assert assert_one_message(events) == clean
    assert sum(grew(rescued, stats(client)[0]).values()) == 1


@pytest.mark.parametrize("spec", ["cut:after=3", "stall-ping:after=3,interval=0.2"])
def test_chat_stream_is_continued_by_replay_only(client, fake, spec):
    args = openai_args(f"chat {spec}", stream=True, stream_options={"include_usage": True})
    clean = [e.json() for e in client.submit("openai", "chat.completions.create", **args)]
    rescued, continued = stats(client)
    before = served(fake.url)
    chunks = [e.json() for e in client.submit("openai", "chat.completions.create", **args, **fault(spec))]
    assert chat_text(chunks) == chat_text(clean) and chunks[-1]["usage"] == clean[-1]["usage"]
    assert grew(rescued, stats(client)[0]) == {"replay": 1}
    assert grew(continued, stats(client)[1]) == {"replay:ok": 1}
    metrics = {(s.name, *s.labels.values()): s.value for f in families(client.snapshot()) for s in f.samples}
    assert metrics[("isopool_rescued_total", "replay")] == stats(client)[0]["replay"]
    assert metrics[("isopool_continuations_total", "replay:ok")] == stats(client)[1]["replay:ok"]
    assert "prefill.accepted" not in grew(before, served(fake.url))


def unstreamed(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k != "stream"}


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(block.split(b"data: ", 1)[1]) for block in raw.strip().split(b"\n\n") if b"data: {" in block]


@pytest.mark.parametrize("spec", ["cut:after=3", "stall-ping:after=3,interval=0.2", "cut:after=7"])
def test_gateway_answers_a_broken_stream_whole(pool, client, fake, spec):
    def want(prompt: str) -> Any:
        with anthropic.Anthropic(base_url=fake.url) as direct:
            return direct.messages.create(**anthropic_args(prompt))

    rescued = stats(client)[0]
    headers = {"anthropic-version": "2023-06-01", FAULT_HEADER: spec}
    body = {**anthropic_args(f"gateway {spec}"), "stream": True}
    raw = httpx.post(pool.http_url + "/v1/messages", json=body, headers=headers, timeout=30)
    assert assert_one_message(sse_events(raw.content)) == want(f"gateway {spec}").content[0].text
    assert raw.content.endswith(b'data: {"type":"message_stop"}\n\n: isopool continued (prefill)\n\n')
    with anthropic.Anthropic(base_url=pool.http_url, max_retries=0) as sdk:
        with sdk.messages.stream(**anthropic_args(f"gateway sdk {spec}"), **fault(spec)) as stream:
            message = stream.get_final_message()
    whole = want(f"gateway sdk {spec}")
    assert message.content[0].text == whole.content[0].text and len(message.content) == 1
    assert message.usage.input_tokens == whole.usage.input_tokens and message.stop_reason == "end_turn"
    assert sum(grew(rescued, stats(client)[0]).values()) == 2  # both were broken, and continued


@pytest.mark.parametrize("spec", ["cut:after=3", "stall-ping:after=3,interval=0.2", "cut:after=7"])
def test_shim_answers_a_broken_stream_whole(pool, client, fake, spec):
    rescued = stats(client)[0]
    args = anthropic_args(f"shim {spec}")
    with anthropic.Anthropic(base_url=fake.url) as direct:
        want = direct.messages.create(**args)
    with shim_anthropic.Anthropic(pool=pool) as shim:
        with shim.messages.stream(**args, **fault(spec)) as stream:
            message = stream.get_final_message()
    assert message.content[0].text == want.content[0].text and len(message.content) == 1
    assert message.usage.input_tokens == want.usage.input_tokens
    with shim_openai.OpenAI(pool=pool) as shim:
        chunks = list(shim.chat.completions.create(**openai_args(f"shim {spec}"), stream=True, **fault(spec)))
    with openai.OpenAI(base_url=fake.url + "/v1") as direct:
        clean = direct.chat.completions.create(**openai_args(f"shim {spec}"))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == clean.choices[0].message.content
    assert sum(grew(rescued, stats(client)[0]).values()) == 2


def test_prefill_continuation_is_stitched_and_its_usage_is_its_own(client, fake):
    """The continuation is prefilled (the fake saw a prefilled request): its output tokens are the
    usage's, the input tokens are the first message_start's."""
    args = anthropic_args("prefill usage", stream=True)
    clean = [e.json() for e in client.submit("anthropic", "messages.create", **args)]
    before, (_, continued) = served(fake.url), stats(client)
    call = client.submit("anthropic", "messages.create", **args, **fault("cut:after=7"))
    events = [e.json() for e in call]
    assert assert_one_message(events) == assert_one_message(clean)
    assert call.served.rescue == "prefill" and call.served.attempts == 2  # type: ignore[union-attr]
    assert grew(before, served(fake.url)) == {"messages.stream": 2, "prefill.accepted": 1}
    assert grew(continued, stats(client)[1]) == {"prefill:ok": 1}
    delivered = 4  # message_start, content_block_start and 4 deltas of 7 events (a ping among them)
    usage = next(e for e in events if e["type"] == "message_delta")["usage"]
    total = next(e for e in clean if e["type"] == "message_delta")["usage"]["output_tokens"]
    assert usage == {"output_tokens": total - delivered}
    assert events[0]["message"]["usage"] == clean[0]["message"]["usage"]


def test_a_model_that_refuses_prefill_is_replayed_and_its_400_never_seen(client, pool, fake):
    args = anthropic_args("no prefill here", stream=True, model="claude-fake-noprefill")
    clean = assert_one_message([e.json() for e in client.submit("anthropic", "messages.create", **args)])
    before, (_, continued) = served(fake.url), stats(client)
    events = [e.json() for e in client.submit("anthropic", "messages.create", **args, **fault("cut:after=7"))]
    assert assert_one_message(events) == clean
    assert grew(before, served(fake.url)) == {"messages.stream": 2, "prefill.refused": 1}
    assert grew(continued, stats(client)[1]) == {"prefill:refused": 1, "replay:ok": 1}
    # the model's refusal is remembered: its next broken stream is replayed without a prefill first
    with anthropic.Anthropic(base_url=fake.url) as direct:
        want = direct.messages.create(**unstreamed(args), system="s").content[0].text
    before, (_, continued) = served(fake.url), stats(client)
    with shim_anthropic.Anthropic(pool=pool) as shim:
        with shim.messages.stream(**unstreamed(args), **fault("stall-ping:after=7,interval=0.2"), system="s") as s:
            assert s.get_final_text() == want
    assert grew(before, served(fake.url)) == {"messages.stream": 2}
    assert grew(continued, stats(client)[1]) == {"replay:ok": 1}
    # without replay to fall to, the caller gets the error the stream broke with, not the prefill's 400
    args["messages"][0]["content"] = "no prefill, no replay"
    with pytest.raises(StreamIncomplete) as raised:
        list(client.submit("prefill-only", "messages.create", **args, **fault("cut:after=7")))
    assert raised.value.info.rescue == "the provider refused the prefill and replay is off"
    assert raised.value.info.status is None and "400" not in str(raised.value)


@pytest.mark.parametrize("spec", ["cut:after=7,vary=true", "stall-ping:after=7,interval=0.2,vary=true"])
def test_a_divergent_replay_ends_with_the_original_typed_error(client, pool, spec):
    args = anthropic_args(f"diverge {spec}", stream=True)
    error = StreamIncomplete if spec.startswith("cut") else StreamStalled
    _, continued = stats(client)
    seen = []
    with pytest.raises(error) as raised:
        seen.extend(e.json() for e in client.submit("replay-only", "messages.create", **args, **fault(spec)))
    assert raised.value.info.rescue.startswith("replay diverged at char ") and "not continued" in str(raised.value)
    assert [e["type"] for e in seen].count("content_block_delta") == 4  # nothing of the replay was forwarded
    assert grew(continued, stats(client)[1]) == {"replay:diverged": 1}
    chat = openai_args(f"diverge {spec}", stream=True)
    with pytest.raises(error, match="replay diverged"):
        list(client.submit("openai", "chat.completions.create", **chat, **fault(spec.replace("7", "5"))))
    with shim_anthropic.Anthropic(pool=pool, pool_profile="replay-only") as shim:
        with pytest.raises(anthropic.APIConnectionError, match="replay diverged") as raised:
            with shim.messages.stream(**unstreamed(args), **fault(spec), system="the shim's") as stream:
                stream.get_final_text()
    assert raised.value.delivered == 6 and raised.value.pool_rescue.startswith("replay diverged")  # type: ignore[attr-defined]


THINKING = {"type": "enabled", "budget_tokens": 1024}


@pytest.mark.parametrize(
    "how",
    [
        pytest.param({"thinking": THINKING}, marks=needs_sdk("thinking"), id="kwarg"),
        pytest.param({"extra_body": {"thinking": THINKING}}, id="extra_body"),  # how an SDK before `thinking` sends it
    ],
)
def test_extended_thinking_is_never_continued(client, how):
    thinking = anthropic_args(f"think {list(how)}", stream=True, **how)
    with pytest.raises(StreamIncomplete) as raised:
        list(client.submit("anthropic", "messages.create", **thinking, **fault("cut:after=7")))
    assert "extended thinking" in raised.value.info.rescue and raised.value.info.attempts == 1


def test_tool_use_is_never_prefilled_and_is_replayed_whole(client):
    tools = anthropic_args("call a tool", stream=True, tools=[TOOL])
    with pytest.raises(StreamIncomplete) as raised:
        list(client.submit("prefill-only", "messages.create", **tools, **fault("cut:after=5")))
    assert "tool use is never prefilled" in raised.value.info.rescue
    # replayed, a tool call comes whole: its input JSON equals the unfaulted one
    tools["messages"][0]["content"] = "call a tool again"
    clean = [e.json() for e in client.submit("anthropic", "messages.create", **tools)]
    rescued = stats(client)[0]
    replayed = [e.json() for e in client.submit("anthropic", "messages.create", **tools, **fault("cut:after=5"))]
    assert replayed == clean and grew(rescued, stats(client)[0]) == {"replay": 1}


@pytest.mark.parametrize("spec", ["cut:after=7", "stall-ping:after=7,interval=0.2"])
def test_not_opted_in_a_broken_stream_ends_as_before(client, fake, spec):
    args = anthropic_args(f"plain {spec}", stream=True)
    before, (rescued, continued) = served(fake.url), stats(client)
    error, message = (StreamIncomplete, "without message_stop") if "cut" in spec else (StreamStalled, "not retried")
    with pytest.raises(error, match=message) as raised:
        list(client.submit("plain", "messages.create", **args, **fault(spec)))
    assert raised.value.info.rescue == "" and "continued" not in str(raised.value)
    assert grew(before, served(fake.url)) == {"messages.stream": 1}
    assert stats(client) == (rescued, continued)
    with pytest.raises(error):
        list(client.submit("plain-openai", "chat.completions.create", **openai_args(f"plain {spec}", stream=True),
                           **fault(spec.replace("7", "3"))))  # fmt: skip


def test_continuations_are_attempts_of_the_one_budget(client, fake):
    args = anthropic_args("budget", stream=True)
    clean = assert_one_message([e.json() for e in client.submit("anthropic", "messages.create", **args)])
    before = served(fake.url)
    with pytest.raises(StreamIncomplete) as raised:  # cut, its continuation cut again: two attempts spent
        list(client.submit("anthropic", "messages.create", **args, **fault("cut:after=7,times=2"), max_attempts=2))
    assert "max_attempts (2) reached" in raised.value.info.rescue and raised.value.info.attempts == 2
    assert grew(before, served(fake.url))["messages.stream"] == 2
    args["messages"][0]["content"] = "budget again"
    clean = assert_one_message([e.json() for e in client.submit("anthropic", "messages.create", **args)])
    events = [e.json() for e in client.submit("anthropic", "messages.create", **args, **fault("cut:after=7,times=2"))]
    assert assert_one_message(events) == clean  # the pool's three attempts: cut, cut, whole


def test_the_deadline_bounds_continuations(client, fake):
    args = anthropic_args("deadline", stream=True)
    before = served(fake.url)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        list(client.submit("anthropic", "messages.create", **args, **fault("stall-ping:after=7,interval=0.2,times=9"),
                           deadline=2.5, max_attempts=9))  # fmt: skip
    assert time.monotonic() - start < 2.5 + 1.5
    assert grew(before, served(fake.url))["messages.stream"] <= 3  # one per stale_timeout, then the deadline


@needs_sdk("responses")
def test_what_cannot_be_continued_ends_with_its_own_error(client):
    """The Responses API is not continued (its sequence numbers and item ids would need rewriting)."""
    args = {"model": "gpt-fake", "input": "responses", "stream": True}
    with pytest.raises(StreamIncomplete) as raised:
        list(client.submit("openai", "responses.create", **args, **fault("cut:after=5")))
    assert "not continuable: responses.create" in raised.value.info.rescue


def test_a_chat_tool_call_is_replayed_whole(client):
    tool = {"type": "function", "function": {"name": TOOL["name"], "parameters": TOOL["input_schema"]}}
    args = openai_args("chat tool", stream=True, tools=[tool])
    clean = [e.json() for e in client.submit("openai", "chat.completions.create", **args)]
    rescued = stats(client)[0]
    replayed = [e.json() for e in client.submit("openai", "chat.completions.create", **args, **fault("cut:after=3"))]
    assert replayed == clean and grew(rescued, stats(client)[0]) == {"replay": 1}
    assert "tool_calls" in clean[1]["choices"][0]["delta"]  # the cut came inside the tool call's arguments


# The splices as pure functions, on streams the fake does not make.


def anthropic_stream(*texts: str, end: bool = True) -> list[tuple[str, bytes]]:
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 9}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
    ]
    events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}} for t in texts]
    if end:
        events += [{"type": "content_block_stop", "index": 0},
                   {"type": "message_delta", "delta": {}, "usage": {"input_tokens": 12, "output_tokens": 3}},
                   {"type": "message_stop"}]  # fmt: skip
    return [(e["type"], json.dumps(e).encode()) for e in events]


def spliced(splice: Any, stream: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(data) for name, data in stream if (out := splice.rewrite(name, data)) for data in [out[1]]]


def test_prefill_drops_what_the_continuation_repeats_of_the_stripped_whitespace():
    seen = Seen("anthropic", anthropic_stream("Hello", " there, ", end=False))
    assert Prefill.text(seen).rstrip() == "Hello there,"  # what is sent as the prefill
    out = spliced(Prefill(seen, " "), anthropic_stream(" wor", "ld"))
    assert [e["type"] for e in out] == ["content_block_delta"] * 2 + [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [out[0]["delta"]["text"], out[1]["delta"]["text"]] == ["wor", "ld"]  # "Hello there, world"
    assert out[3]["usage"] == {"output_tokens": 3}  # the caller has the input tokens from its message_start
    out = spliced(Prefill(Seen("anthropic", anthropic_stream("Hi  ", end=False)), "  "), anthropic_stream(" ", " x"))
    assert out[0]["delta"]["text"] == "x"  # the whitespace repeated over two deltas


def test_replay_forwards_only_what_was_not_delivered_however_it_is_chunked():
    seen = Seen("anthropic", anthropic_stream("Hel", "lo wo", end=False))
    out = spliced(Replay(seen), anthropic_stream("He", "llo", " world", "!"))
    assert [e["delta"]["text"] for e in out if e["type"] == "content_block_delta"] == ["rld", "!"]
    assert [e["type"] for e in out][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    with pytest.raises(Diverged, match="at char 3 of block 0"):
        spliced(Replay(Seen("anthropic", anthropic_stream("Hello", end=False))), anthropic_stream("Help!"))
    with pytest.raises(Diverged, match="block 0 ended shorter"):
        spliced(Replay(Seen("anthropic", anthropic_stream("Hello there", end=False))), anthropic_stream("Hello"))


def test_strategies_resolve_by_model_rule_then_profile():
    settings = load_settings(
        profiles={
            "claude": {"kind": "anthropic", "continue_streams": BOTH, "models": {"*-opus-*": {"continue_streams": []}}},
            "local": {"kind": "openai", "continue_streams": BOTH},
        },
        models={"*-noprefill": {"continue_streams": ["replay"]}},
    )
    assert strategies_for(settings, "claude", "claude-sonnet") == BOTH
    assert strategies_for(settings, "claude", "claude-opus-5") == []  # the profile's own rule first
    assert strategies_for(settings, "claude", "claude-x-noprefill") == ["replay"]
    assert strategies_for(settings, "local", "llama") == ["replay"]  # OpenAI has no prefill
    with pytest.raises(ConfigError, match=r"profile claude model '\*': continue_streams takes prefill and replay"):
        load_settings(profiles={"claude": {"kind": "anthropic", "models": {"*": {"continue_streams": ["resume"]}}}})


def test_the_asyncio_shim_gets_a_broken_stream_whole(pool, client, fake):
    with anthropic.Anthropic(base_url=fake.url) as direct:
        want = direct.messages.create(**anthropic_args("async shim")).content[0].text
    rescued = stats(client)[0]

    async def run() -> str:
        async with shim_anthropic.AsyncAnthropic(pool=pool) as shim:
            async with shim.messages.stream(**anthropic_args("async shim"), **fault("cut:after=7")) as stream:
                return await stream.get_final_text()

    assert asyncio.run(run()) == want and sum(grew(rescued, stats(client)[0]).values()) == 1


def test_a_stream_moved_to_a_fallback_is_continued_there_on_its_model(client, fake):
    """The call's own target is down (503); its fallback's stream is cut after output; the continuation
    goes to the fallback with the fallback's model, not the call's own."""
    args = openai_args("moved then cut", stream=True, model="gpt-fake@unavailable:for=600")
    clean = [e.json() for e in client.submit("openai", "chat.completions.create", **{**args, "model": "gpt-fake"})]
    call = client.submit("primary", "chat.completions.create", **args, max_attempts=4)  # 503, 503, moved, continued
    assert chat_text([e.json() for e in call]) == chat_text(clean)
    assert call.served.profile == "cutting" and call.served.rescue == "replay"  # type: ignore[union-attr]


def test_a_continued_stream_bills_both_attempts_what_the_provider_reported(client, fake):
    """The broken attempt's usage (its message_start's) and the continuation's own, as the fake reported them."""
    fields = ("input", "output", "cache_read", "cache_write")
    before, billed = fake.stats()["usage"], client.snapshot().tokens.get("anthropic/claude-fake", Tokens())
    events = [e.json() for e in client.submit("anthropic", "messages.create", **anthropic_args("continued usage",
                                              stream=True), **fault("cut:after=7"))]  # fmt: skip
    assert_one_message(events)
    after, now = fake.stats()["usage"], client.snapshot().tokens["anthropic/claude-fake"]
    assert {f: getattr(now, f) - getattr(billed, f) for f in fields} == {f: after[f] - before[f] for f in fields}
    assert now.attempts - billed.attempts == 2 and now.output - billed.output > 1
