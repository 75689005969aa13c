"""A worker coalesces a stream's events (setting coalesce_ms): a fast stream reaches the caller in few
messages, the first event and any after a pause at once, what is held within the window (also when the
stream then stalls), everything in the provider's order, numbered exactly, the answer unchanged."""

from __future__ import annotations

import asyncio
import time

import anthropic
import msgspec
import pytest

from broker import ConfigError, Pool
from broker.config import load_settings
from broker.fake_provider import LATENCY_HEADER
from broker.protocol import Code, Codec, ErrorInfo, Kind, Response
from broker.shim import anthropic as shim_anthropic
from worker.main import Emitter
from worker.usage import Facts

from .conftest import TEST_SETTINGS, anthropic_args, fault, profiles

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

WINDOW = 0.05  # the longest window (config.MAX_COALESCE_MS): holding is certain, never a stall
_BATCH = msgspec.msgpack.Decoder(list[tuple[str, bytes]])


class Wire:
    """A worker socket's stand-in for one function's unit test: the records the emitter sent, decoded, in
    order, and how many messages carried them."""

    def __init__(self) -> None:
        self.codec, self.sent, self.headers, self.messages = Codec(), [], [], []

    def send(self, frames: list[bytes]) -> None:
        records = self.codec.records(frames)
        for kind, header, payload in records:
            self.sent.append((kind, [name for name, _ in _BATCH.decode(payload)] if kind == Kind.EVENT else None))
            self.headers.append(header)
        self.messages.append([kind for kind, _, _ in records])

    def kinds(self) -> list[Kind]:
        return [kind for kind, _ in self.sent]


def emitter(window: float = WINDOW) -> tuple[Emitter, Wire]:
    wire = Wire()
    return Emitter(wire, wire.codec, 7, window), wire  # type: ignore[arg-type]


def events(*names: str) -> list[tuple[str, bytes]]:
    return [(name, b"{}") for name in names]


def test_the_first_event_and_any_after_a_pause_go_at_once_the_rest_within_the_window():
    async def scenario() -> Wire:
        emit, wire = emitter()
        await emit.events(events("a"))
        assert wire.sent == [(Kind.EVENT, ["a"])]  # sent in the call itself: time to first token unchanged
        await emit.events(events("b"))
        await emit.events(events("c", "d"))
        assert len(wire.sent) == 1  # held: an event went out less than a window ago
        await asyncio.sleep(WINDOW * 3)  # the stream pauses: the timer sends what is held
        assert wire.sent[1] == (Kind.EVENT, ["b", "c", "d"])
        await asyncio.sleep(WINDOW * 1.5)
        await emit.events(events("e"))  # after a quiet window: at once
        assert wire.sent[2] == (Kind.EVENT, ["e"])
        return wire

    wire = asyncio.run(scenario())
    assert len(wire.sent) == 3


def test_every_other_message_sends_what_is_held_first_numbered_in_order():
    async def scenario() -> Wire:
        emit, wire = emitter()
        await emit.head(Response(200, [("content-type", "text/event-stream")]))
        steps = [
            emit.usage(Facts()),
            emit.progress(),
            emit.ending(),
            emit.error_event(("error", b"{}")),
            emit.result(None),
        ]
        for n, step in enumerate(steps):
            await emit.events(events(f"{n}a"))
            await emit.events(events(f"{n}b"))  # held behind the first (or behind the last message's flush)
            await step
        await asyncio.sleep(WINDOW * 3)  # nothing left for the timer to send after the end
        return wire

    wire = asyncio.run(scenario())
    kinds = wire.kinds()
    assert kinds[0] == Kind.HEAD and kinds[-1] == Kind.RESULT
    for other in (Kind.USAGE, Kind.PROGRESS, Kind.ENDING, Kind.RESULT):
        at = kinds.index(other)
        assert Kind.EVENT in kinds[at - 2 : at]  # the held events went just before it (a held USAGE with them)
    names = [name for kind, batch in wire.sent if kind == Kind.EVENT for name in batch]
    assert [n for n in names if n != "error"] == [f"{n}{x}" for n in range(5) for x in "ab"]
    assert names.index("error") == names.index("3b") + 1  # the error event after the events before it
    seq = 1
    for (kind, batch), header in zip(wire.sent, wire.headers, strict=True):
        if kind == Kind.EVENT:
            assert (header.seq, header.count) == (seq, len(batch))
            seq += len(batch)


def test_an_assembled_streams_progress_goes_like_its_events_at_once_after_a_quiet_window():
    """A stream the worker assembles for a non-streaming call sends progress, not events: each was held a
    window, so a slow stream woke the worker twice per token (its read, then the timer), ~4 ms of a
    24-token call's worker CPU (bench faults)."""

    async def scenario() -> Wire:
        emit, wire = emitter()
        await emit.progress()
        assert wire.kinds() == [Kind.PROGRESS]  # sent in the call itself: no timer
        await emit.progress()
        assert len(wire.sent) == 1  # held: a message went out less than a window ago
        await asyncio.sleep(WINDOW * 3)  # the stream pauses: the timer sends it
        assert wire.kinds() == [Kind.PROGRESS] * 2
        await asyncio.sleep(WINDOW * 1.5)
        await emit.progress()  # after a quiet window: at once
        assert wire.kinds() == [Kind.PROGRESS] * 3
        return wire

    asyncio.run(scenario())


def test_usage_reported_with_every_chunk_waits_for_the_held_events_and_keeps_only_the_latest():
    """A server that reports usage in every chunk (vLLM's continuous_usage_stats): found by the session-27
    review, each report flushed what was held, and coalescing was off."""

    async def scenario() -> Wire:
        emit, wire = emitter()
        facts = Facts()
        for n in range(20):
            await emit.events(events(f"e{n}"))
            facts.output = n + 1
            await emit.usage(facts)
        await asyncio.sleep(WINDOW * 3)
        return wire

    wire = asyncio.run(scenario())
    assert wire.kinds() == [Kind.EVENT, Kind.USAGE, Kind.EVENT, Kind.USAGE]  # the first at once, the rest held
    assert [h.output_tokens for k, h in zip(wire.kinds(), wire.headers, strict=True) if k == Kind.USAGE] == [1, 20]


def test_a_cancelled_call_sends_what_it_held_then_its_error_and_nothing_after():
    async def scenario() -> Wire:
        emit, wire = emitter()
        await emit.events(events("a"))
        await emit.events(events("b"))
        await emit.error(ErrorInfo(Code.CANCELLED, "cancelled by the broker"))
        await asyncio.sleep(WINDOW * 3)
        return wire

    wire = asyncio.run(scenario())
    assert wire.sent[:2] == [(Kind.EVENT, ["a"]), (Kind.EVENT, ["b"])]
    assert wire.kinds() == [Kind.EVENT, Kind.EVENT, Kind.ERROR]


def test_a_calls_records_share_messages_the_head_with_the_first_events_the_rest_with_the_end():
    async def scenario() -> tuple[Wire, Wire]:
        emit, wire = emitter()
        await emit.head(Response(200, [("content-type", "text/event-stream")]))
        assert wire.messages == []  # it waits for the first events
        await emit.events(events("a"))
        assert wire.messages == [[Kind.HEAD, Kind.EVENT]]  # which go at once, with it
        await emit.events(events("b"))
        await emit.usage(Facts())
        await emit.ending()
        await emit.result(None)  # at once, with everything held
        alone, later = emitter()
        await alone.head(Response(200))
        await asyncio.sleep(WINDOW * 3)  # no event within the window: the head goes on time, alone
        return wire, later

    wire, later = asyncio.run(scenario())
    assert wire.messages == [[Kind.HEAD, Kind.EVENT], [Kind.EVENT, Kind.USAGE, Kind.ENDING, Kind.RESULT]]
    assert later.messages == [[Kind.HEAD]]


def test_without_a_window_each_record_is_its_own_message():
    async def scenario() -> Wire:
        emit, wire = emitter(0.0)
        await emit.head(Response(200))
        for name in "abc":
            await emit.events(events(name))
        await emit.usage(Facts())
        await emit.result(None)
        return wire

    wire = asyncio.run(scenario())
    assert wire.sent[1:4] == [(Kind.EVENT, [n]) for n in "abc"]
    assert wire.messages == [[Kind.HEAD], [Kind.EVENT], [Kind.EVENT], [Kind.EVENT], [Kind.USAGE], [Kind.RESULT]]


def test_coalesce_ms_is_bounded_well_below_any_stale_timeout():
    assert load_settings(env={}).coalesce_ms > 0  # on by default
    assert load_settings(env={"ISOPOOL_COALESCE_MS": "0"}).coalesce_ms == 0
    for bad in (-1, 51):
        with pytest.raises(ConfigError, match="coalesce_ms"):
            load_settings(env={}, coalesce_ms=bad)


# ----- through the pool -------------------------------------------------------------------------------


LONG = 2000


def long_args(**extra):
    args = anthropic_args("a long one", max_tokens=LONG, **extra)
    args.setdefault("extra_headers", {})[LATENCY_HEADER] = f"tokens={LONG}"
    return args


async def batches(client, **args) -> list[list]:
    """The batches of events a low-level caller received for one stream, each as its list of events."""
    call = await client.submit("anthropic", "messages.create", **args)
    got = []
    while not call._state.done:
        item = call._state.take(await call._state.sink.queue.get())
        if isinstance(item, list):
            got.append(item)
    call._state.finish()
    return got


def text_of(events) -> str:
    return "".join(e.json()["delta"].get("text", "") for e in events if e.name == "content_block_delta")


def test_a_fast_stream_reaches_the_caller_in_few_messages_with_the_same_answer(pool):
    """The session pool, at the default setting."""

    async def scenario():
        async with pool.async_client() as client:
            got = await batches(client, **long_args(stream=True))
            whole = await client.request("anthropic", "messages.create", **long_args())
            return got, whole

    got, whole = asyncio.run(scenario())
    flat = [event for batch in got for event in batch]
    assert len(flat) > LONG  # every delta, and the events around them
    # one message per event without coalescing; about one per ten on a quiet machine, one per eight seen in a full
    # suite at load 5 (the fake's writes then come further apart, and a window holds fewer): a loosened bound
    assert len(got) < len(flat) / 5, f"{len(flat)} events came in {len(got)} messages"
    assert flat[0].name == "message_start" and flat[-1].name == "message_stop"
    assert text_of(flat) == whole.json()["content"][0]["text"]


@pytest.fixture(scope="module")
def wide(fake):
    """A pool with the longest window and a short stale_timeout: what is held must not look stalled."""
    settings = dict(TEST_SETTINGS, stale_timeout=1.0, coalesce_ms=WINDOW * 1000, http="127.0.0.1:0")
    with Pool(profiles=profiles(fake.url, min_workers=1), **settings) as p:
        yield p


def test_a_stream_that_stalls_delivers_what_was_held_within_the_window(wide):
    async def scenario():
        async with wide.async_client() as client:
            args = anthropic_args("pause", max_tokens=100, stream=True)
            args["extra_headers"] = {LATENCY_HEADER: "tokens=100", **fault("silent:after=30")["extra_headers"]}
            call = await client.submit("anthropic", "messages.create", **args)
            seen = []
            with pytest.raises(Exception, match="stale"):
                async for _ in call:
                    seen.append(time.monotonic())
            return seen, time.monotonic()

    seen, ended = asyncio.run(scenario())
    assert len(seen) == 29  # the 30 written but Anthropic's ping: none lost with the worker the stall killed
    assert seen[-1] - seen[0] < 0.5 < ended - seen[-1]  # within the window, long before the stall was called


def test_long_streams_through_the_shim_and_the_gateway_are_whole_and_in_order(fake, wide):
    args = long_args()
    direct = anthropic.Anthropic(base_url=fake.url)
    relayed = [shim_anthropic.Anthropic(pool=wide), anthropic.Anthropic(base_url=wide.http_url)]
    with direct, relayed[0], relayed[1]:
        want = [e.model_dump(exclude={"message"}) for e in direct.messages.create(stream=True, **args)]
        for client in relayed:
            got = [e.model_dump(exclude={"message"}) for e in client.messages.create(stream=True, **args)]
            assert got == want
