"""Bedrock's event-stream frames (issue 20, step 2): written by broker/eventstream.py, read by
worker/frames.py on botocore's parser and the SDK's own decoder, from any chunking."""

from __future__ import annotations

import asyncio
import json

import pytest

from broker import eventstream
from broker.protocol import Code
from worker.errors import translate
from worker.hygiene import AnthropicCheck, StreamIncomplete

from .cloudkit import needs_clouds

pytestmark = needs_clouds

START = {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": [],
         "model": "x", "stop_reason": None, "usage": {"input_tokens": 3, "output_tokens": 0}}}  # fmt: skip
EVENTS = [
    START,
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    *(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"tok{i} "}}
        for i in range(3)
    ),
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
    {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 3}},
]
PING = eventstream.chunk(b'{"type": "ping"}')


def _wire(events=EVENTS) -> bytes:
    return b"".join(eventstream.chunk(json.dumps(e).encode()) for e in events)


def _split(wire: bytes, size: int) -> list[tuple[str, bytes]]:
    from worker.frames import FrameSplitter

    splitter = FrameSplitter()
    out = [e for i in range(0, len(wire), size) for e in splitter.feed(wire[i : i + size])]
    return out + splitter.end()


@pytest.mark.parametrize("size", [1, 7, 1 << 20])
def test_frames_read_back_as_the_events_they_carry_from_any_chunking(size):
    wire = _wire(EVENTS[:3]) + PING + _wire(EVENTS[3:])
    events = _split(wire, size)
    assert [(name, json.loads(data)) for name, data in events] == [(e["type"], e) for e in EVENTS]  # no ping


def test_the_events_are_what_the_sdks_own_bedrock_decoder_gives_its_caller():
    from anthropic.lib.bedrock._stream_decoder import AWSEventStreamDecoder

    wire = _wire() + eventstream.exception("throttlingException", "Too many requests")
    oracle = [(s.event, s.data.encode()) for s in AWSEventStreamDecoder().iter_bytes(iter([wire]))]
    assert _split(wire, 5) == oracle


def test_an_exception_frame_is_an_error_event():
    from worker.calls import is_error_event

    [(name, data)] = _split(eventstream.exception("modelStreamErrorException", "boom"), 3)
    assert is_error_event(name, data)
    assert json.loads(data) == {"type": "error", "error": {"type": "modelStreamErrorException", "message": "boom"}}


def test_frames_that_carry_no_answer_event_are_no_progress():
    other = eventstream.event("metadata", b"{}")
    assert _split(other + PING + other, 4) == []


def test_a_bad_checksum_is_a_corrupted_stream():
    from worker.frames import FramesCorrupted

    bad = bytearray(_wire(EVENTS[:1]))
    bad[-1] ^= 1
    with pytest.raises(FramesCorrupted, match="ChecksumMismatch") as caught:
        _split(bytes(bad), 64)
    assert translate(caught.value).code == Code.PROVIDER_CONNECTION  # retried while nothing was forwarded


def test_the_events_before_a_corrupted_frame_in_the_same_read_go_out_then_the_corruption():
    """Two good frames and a bad one in one read: the two are real events (a caller has them), the
    corruption is raised at the next read or the end."""
    from worker.frames import FramesCorrupted, FrameSplitter

    bad = bytearray(_wire(EVENTS[2:3]))
    bad[-1] ^= 1
    splitter = FrameSplitter()
    assert [name for name, _ in splitter.feed(_wire(EVENTS[:2]) + bytes(bad))] == [
        "message_start",
        "content_block_start",
    ]
    with pytest.raises(FramesCorrupted, match="ChecksumMismatch"):
        splitter.end()


async def _batches(wire: bytes) -> list[list[tuple[str, bytes]]]:
    from worker.frames import iter_frames

    async def reads():
        for i in range(0, len(wire), 9):
            yield wire[i : i + 9]

    return [batch async for batch in iter_frames(reads(), AnthropicCheck())]


def test_a_whole_stream_passes_the_check_and_one_cut_short_is_incomplete():
    batches = asyncio.run(_batches(_wire()))
    assert sum(map(len, batches)) == len(EVENTS) and len(batches) > 1  # each read's events as they complete
    cut = _wire(EVENTS[:-1]) + eventstream.chunk(b'{"type": "message_stop"}')[:20]  # a frame half-sent, then the end
    with pytest.raises(StreamIncomplete, match="message_stop"):
        asyncio.run(_batches(cut))
