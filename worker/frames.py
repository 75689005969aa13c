"""Bedrock's event-stream frames split from raw bytes into the Anthropic events they carry.

botocore parses the frames (`EventStreamBuffer`: lengths and CRCs, from any chunking) and the
SDK's own `AWSEventStreamDecoder` turns each message into the event its client would see: a `chunk`
into its Anthropic event, an exception frame into an `error` event. So a Bedrock stream reaches
StreamCheck, assembly and the broker as the same `(event name, JSON)` pairs as a first-party one
(~18 µs an event). What is not an answer event counts as no progress, as an SSE ping does: a
frame of another event type, and a `ping` chunk. A frame whose checksum fails is a corrupted
connection, not an answer: FramesCorrupted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from .hygiene import StreamCheck
from .sse import iter_batches


class FramesCorrupted(Exception):
    """The provider's event-stream bytes are not frames (a bad length or checksum)."""


class FrameSplitter:
    """Raw bytes in, the events of the frames they complete out; the same interface as sse.EventSplitter
    (an event stream has no `[DONE]`: it is done when its bytes end)."""

    __slots__ = ("_broken", "_buffer", "_decoder", "_errors", "done", "said_done")

    def __init__(self) -> None:
        from anthropic.lib.bedrock._stream_decoder import AWSEventStreamDecoder
        from botocore.eventstream import EventStreamBuffer, ParserError

        self._buffer, self._decoder, self._errors = EventStreamBuffer(), AWSEventStreamDecoder(), ParserError
        self._broken: FramesCorrupted | None = None
        self.done = self.said_done = False

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """The events of the frames `chunk` completes. Those before a corrupted frame are real: they go out,
        and the corruption is raised at the next read (or the end)."""
        self._raise_if_broken()
        self._buffer.add_data(chunk)
        batch = []
        try:
            for message in self._buffer:
                sse = self._decoder._parse_message_from_event(message)
                if sse is not None and sse.event != "ping":
                    batch.append((sse.event or "", sse.data.encode()))
        except self._errors as exc:
            self._broken = FramesCorrupted(f"the provider's event stream is corrupted ({type(exc).__name__}: {exc})")
            if not batch:
                self._raise_if_broken()
        return batch

    def end(self) -> list[tuple[str, bytes]]:
        """The bytes ended: a frame left half-read carries no event (the check then finds the stream cut short)."""
        self._raise_if_broken()
        self.done = True
        return []

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise self._broken


def iter_frames(
    chunks: AsyncIterator[bytes], check: StreamCheck | None = None
) -> AsyncIterator[list[tuple[str, bytes]]]:
    """sse.iter_batches for an event stream: the events of each read, checked by `check`."""
    return iter_batches(chunks, check, FrameSplitter())
