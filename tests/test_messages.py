"""Few messages per call on each hop (issue 21): a worker sends a call's records together (its head with
the first events, its usage, ending and result with the last), and the broker forwards the caller's share
of them as one message. Counted by the broker itself (the snapshot's `messages`), through a real pool,
the fake provider over HTTP and the official SDK via the drop-in shim."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import zmq

from broker import Pool
from broker.protocol import Codec, ErrorInfo, Event, Kind, Served
from broker.protocol import Error as ErrorHeader
from broker.server.callers import Callers
from broker.server.connections import Connections
from broker.shim import anthropic as shim_anthropic
from broker.wire.zmqio import recv_frames, send_frames

from .conftest import TEST_SETTINGS, profiles

pytestmark = pytest.mark.xdist_group(__name__)

CALLS = 6
ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def lone(fake):
    """One anthropic worker; the window wide enough that a loaded machine does not split the records
    a call produces within microseconds of each other."""
    one = profiles(fake.url, min_workers=1, max_workers=1, spare_workers=0)
    with Pool(profiles={"anthropic": one["anthropic"]}, **dict(TEST_SETTINGS, coalesce_ms=20)) as p:
        yield p


def per_call(pool, client, call) -> dict[str, float]:
    """Messages per call on each hop, over CALLS calls (the two STATS exchanges that measure them left out)."""
    call()  # the connection and the worker warm
    before = client.snapshot().messages
    for _ in range(CALLS):
        call()
    after = client.snapshot().messages
    spent = {hop: after[hop] - before.get(hop, 0) for hop in after}
    spent["from_callers"] -= 1  # the second STATS request
    spent["to_callers"] -= 1  # the first STATS answer
    return {hop: n / CALLS for hop, n in spent.items()}


def test_a_tiny_stream_and_a_count_tokens_take_few_messages_on_each_hop(lone):
    sdk = shim_anthropic.Anthropic(pool=lone)
    with sdk, lone.client() as client:

        def stream() -> None:
            events = list(sdk.messages.create(model="claude-fake", max_tokens=8, messages=ASK, stream=True))
            assert events[-1].type == "message_stop"

        def count() -> None:
            assert sdk.messages.count_tokens(model="claude-fake", messages=ASK).input_tokens > 0

        streamed, counted = per_call(lone, client, stream), per_call(lone, client, count)
    # a stream: its head with its first events at once (the time to first token unchanged), the rest with its end
    assert streamed["from_callers"] == streamed["to_workers"] == 1, streamed
    assert streamed["from_workers"] <= 2.5, streamed  # 5 to 7 on main; a slow moment may split one
    assert streamed["to_callers"] <= 2.5, streamed  # 3 to 4 on main
    # an answer in one piece: one message each way on each hop
    assert counted == {"from_callers": 1, "to_workers": 1, "from_workers": 1, "to_callers": 1}, counted


def answers(codec: Codec, rid: int) -> list[list[bytes]]:
    """A stream's head, one batch of events and its end, as the broker sends each to its caller."""
    return [codec.frames(Kind.HEAD, Served(rid), b"{}"), codec.frames(Kind.EVENT, Event(rid, 1), b"\x90"),
            codec.frames(Kind.RESULT, Served(rid), b"")]  # fmt: skip


@contextlib.contextmanager
def a_caller(hwm: int = 1000) -> Iterator[tuple[zmq.Socket, zmq.Socket, bytes]]:
    """A broker's frontend (a ROUTER that reports a caller it cannot reach), one caller (a DEALER) connected to it
    over inproc with `hwm` messages queued each way at most, and the routing id the ROUTER gave that caller."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.sndhwm = dealer.rcvhwm = hwm
        router.bind("inproc://callers")
        dealer.connect("inproc://callers")
        dealer.send(b"hello")
        yield router, dealer, router.recv_multipart()[0]
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def test_what_the_broker_gathers_for_a_caller_reaches_it_as_one_message():
    codec = Codec()
    with a_caller() as (router, dealer, client):
        callers = Callers(router, Connections(100, 100, 100, 2**20), codec, 8, lambda *_: None)
        callers.gather()
        assert all(callers.send(client, frames) for frames in answers(codec, 4))
        callers.release()
        assert [kind for kind, _, _ in codec.records(dealer.recv_multipart())] == [Kind.HEAD, Kind.EVENT, Kind.RESULT]
        assert callers.sent == 1 and not dealer.poll(0)


def test_a_gathered_message_a_caller_cannot_take_cuts_it_off_and_parks_each_end_it_carried():
    codec, cut = Codec(), []
    with a_caller(hwm=1) as (router, _, client):
        with pytest.raises(zmq.Again):  # a caller that stopped reading: its queue fills, then a send is refused
            for _ in range(100):
                router.send_multipart([client, b"filler"], zmq.NOBLOCK)
        connections = Connections(100, 100, 100, 2**20)
        callers = Callers(router, connections, codec, 8, lambda client, why, now: cut.append(client))
        error = codec.frames(Kind.ERROR, ErrorHeader(5, "cancelled"), codec.encode(ErrorInfo("cancelled", "x")))
        callers.gather()
        for frames in [*answers(codec, 4), error]:
            callers.send(client, frames)
        callers.release()
        assert cut == [client] and callers.parked(client)
        parked = connections.get(client).parked
        assert [codec.parse(frames)[0] for frames in parked] == [Kind.RESULT, Kind.ERROR]  # each request's one answer


def test_frames_go_only_through_a_zeromq_socket():
    """The backend's send and recv read any object as a socket: a stand-in crashed the test process once."""
    for use in (lambda: send_frames(object(), [b"x"]), lambda: recv_frames(object())):  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="a ZeroMQ socket is needed"):
            use()
