"""The wire protocol: round trips, rejection of anything malformed, and the typed stats snapshot."""

from __future__ import annotations

import json

import msgspec
import pytest
import zmq

from broker.protocol import (
    HEADERS,
    MAX_HEADER_BYTES,
    Codec,
    ErrorInfo,
    Event,
    Heartbeat,
    Kind,
    ProtocolError,
    Ready,
    Ref,
    Response,
    Run,
    Served,
    Spent,
    Submit,
)

from .conftest import anthropic_args

SAMPLES = {
    Kind.SUBMIT: Submit(1, "anthropic", "claude", True, 1.0, 2.0, 3.0, 4),
    Kind.CANCEL: Ref(2),
    Kind.STATS: Ref(3),
    Kind.PING: Ref(4),
    Kind.EVENT: Event(5, 6, 3),
    Kind.RESULT: Served(7, 3, "openai", "us", "gpt-fake", "fallback"),
    Kind.ERROR: ErrorInfo,  # placeholder, replaced below
    Kind.HEAD: Served(8),
    Kind.PROGRESS: Ref(9),
    Kind.ENDING: Ref(9),
    Kind.RUN: Run(10, 2),
    Kind.ABORT: Ref(11),
    Kind.READY: Ready("anthropic.0.0", 1234, 1, 1),
    Kind.HEARTBEAT: Heartbeat("anthropic.0.0", "0f" * 16),
    Kind.USAGE: Spent(13, 120, 40, 100, 5, "msg_01", "claude-fake", ["end_turn"]),
}


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind):
    from broker.protocol import Error

    codec = Codec()
    header = Error(12, "stalled") if kind == Kind.ERROR else SAMPLES[kind]
    assert type(header) is HEADERS[kind]
    frames = codec.frames(kind, header, b"payload")
    assert codec.parse(frames) == (kind, header, b"payload")
    assert codec.parse(codec.frames(kind, header)) == (kind, header, b"")


def test_a_workers_bare_head_and_error_headers_read_as_served_with_defaults():
    from broker.protocol import Error

    codec = Codec()
    kind, header, _ = codec.parse(codec.frames(Kind.HEAD, Ref(8)))  # what a worker sends: the request id only
    assert header == Served(8) and header.headers() == []
    _, error, _ = codec.parse([bytes([Kind.ERROR]), codec.encode((12, "stalled"))])
    assert error == Error(12, "stalled", 0, "", "", "", "")
    assert Served(7, 3, "openai", "", "gpt-fake", "fallback").headers() == [
        ("x-isopool-profile", "openai"), ("x-isopool-model", "gpt-fake"), ("x-isopool-attempts", "3"),
        ("x-isopool-rescue", "fallback")]  # fmt: skip


def test_payload_structs_round_trip():
    codec = Codec()
    response = Response(200, [("content-type", "application/json")], b"{}")
    assert codec.response(codec.encode(response)) == response
    info = ErrorInfo("provider_status", "boom", 529, b"{}", [("retry-after", "1")], 3, 2, "OverloadedError")
    assert codec.error(codec.encode(info)) == info


@pytest.mark.parametrize(
    "frames, message",
    [
        ([b"\x01"], "expected 2 or 3 frames"),
        ([b"\x01", b"", b"", b""], "expected 2 or 3 frames"),
        ([b"\x01\x02", b"\x90"], "one byte"),
        ([b"\xff", b"\x90"], "unknown message kind"),
        ([b"\x01", b"\xc1"], "bad SUBMIT header"),
        ([b"\x01", b"\x92\xa1x\x01"], "bad SUBMIT header"),  # rid must be an int
        ([b"\x01", b"\x90" * (MAX_HEADER_BYTES + 1)], "exceeds"),
    ],
)
def test_malformed_frames_are_rejected(frames, message):
    with pytest.raises(ProtocolError, match=message):
        Codec().parse(frames)


def test_a_message_of_several_records_reads_as_each_in_order():
    codec = Codec()
    head, event, end = (Kind.HEAD, Served(3), b"h"), (Kind.EVENT, Event(3, 1, 2), b"e"), (Kind.RESULT, Served(3), b"")
    frames = [frame for record in (head, event, end) for frame in codec.frames(*record)]
    assert codec.records(frames) == [head, event, end]
    assert codec.records(codec.frames(Kind.ENDING, Ref(3))) == [(Kind.ENDING, Ref(3), b"")]  # one record, as parse
    with pytest.raises(ProtocolError, match="records of 3 frames"):
        codec.records(frames[:-1])
    with pytest.raises(ProtocolError, match="expected 2 or 3 frames"):
        codec.parse(frames)  # a caller's message is one record


def test_headers_are_arrays_so_fields_can_only_be_appended():
    # Submit with only the fields an older client knew still decodes, defaults filling the rest.
    codec = Codec()
    old = codec.encode([5, "openai"])
    kind, header, _ = codec.parse([bytes([Kind.SUBMIT]), old])
    assert header == Submit(5, "openai")


def test_the_typed_stats_snapshot_prints_as_the_brokers_own_answer(pool, client):
    """`isopool stats --json` prints the typed snapshot: the same JSON, field for field and int for
    int, as the broker's STATS answer decoded without a type (what it printed before)."""
    client.request("anthropic", "messages.create", **anthropic_args("snapshot"))  # the histograms have counts
    codec = Codec()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        sock.connect(pool.url)
        sock.send_multipart(codec.frames(Kind.STATS, Ref(1)))
        answer = sock.recv_multipart()[2]
    finally:
        sock.close()
    raw = msgspec.msgpack.decode(answer)
    assert raw["latency"]["count"] and raw["workers"]
    assert json.dumps(msgspec.to_builtins(codec.snapshot(answer))) == json.dumps(raw)
