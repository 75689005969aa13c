"""Server-sent events split from raw bytes, keeping each event's data as the provider's own bytes.

Pings (`event: ping`), comment lines (`: keep-alive`) and data-less blocks are not
events: they are dropped here, which is what makes a stream that only pings look stale.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

from .hygiene import GRACE, StreamCheck

DONE = b"[DONE]"
# The block almost every event is (an `event:` line, if any, and one `data:` line): read by one match,
# to what parse_block makes of it; any other block is read by parse_block.
_PLAIN = re.compile(rb"(?:event:([^\n]*)\n)?data: ?([^\n]*)")
_NAMES: dict[bytes, str] = {}  # an `event:` value -> the name it gives, for the few names an API sends


def parse_block(block: bytes) -> tuple[str, bytes] | None:
    """One blank-line-terminated SSE block -> (event name, data) or None if it is not a real event."""
    name = ""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode()
    if not data or name == "ping":
        return None
    return name, data[0] if len(data) == 1 else b"\n".join(data)


def _name(value: bytes) -> str:
    """The name an `event:` value gives, kept for the next event of that name."""
    name = value.strip().decode()
    if len(_NAMES) < 64:  # the provider's bytes: what is kept stays bounded
        _NAMES[value] = name
    return name


class EventSplitter:
    """Raw bytes in, the real events they complete out; `done` once OpenAI's `data: [DONE]` or the
    end of the bytes has been seen, `said_done` if it was the `[DONE]`."""

    __slots__ = ("tail", "done", "said_done")

    def __init__(self) -> None:
        self.tail, self.done, self.said_done = b"", False, False

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        blocks = (self.tail + chunk).split(b"\n\n")
        self.tail = blocks.pop()
        batch = []
        for block in blocks:
            if (plain := _PLAIN.fullmatch(block)) is None:
                event = parse_block(block)
            elif (named := plain[1]) is None:
                event = "", plain[2]
            else:
                event = _NAMES.get(named) or _name(named), plain[2]
            if event is None or event[0] == "ping":
                continue
            if event[1] == DONE:
                self.done = self.said_done = True
                break
            batch.append(event)
        return batch

    def end(self) -> list[tuple[str, bytes]]:
        """The bytes ended: the last event, if they ended without a blank line."""
        tail, self.tail = self.tail, b""
        done, self.done = self.done, True
        if done or not tail.strip() or (event := parse_block(tail)) is None:
            return []
        if event[1] == DONE:
            self.said_done = True
            return []
        return [event]


async def iter_batches(
    chunks: AsyncIterator[bytes], check: StreamCheck | None = None, splitter: Any = None
) -> AsyncIterator[list[tuple[str, bytes]]]:
    """The real events of a byte stream, as lists of those completed by each read (so a
    fast stream is relayed in few messages and a slow one without delay); stops at
    OpenAI's `data: [DONE]`. With a `check`, events that are not JSON are dropped, a stream that
    said it finished is ended if its `[DONE]` or close does not follow within GRACE (pings after
    the end do not extend it), and one whose bytes end before its terminal event raises
    StreamIncomplete. `splitter` reads another wire format (frames.FrameSplitter: Bedrock's event
    stream) into the same events. (One generator, reading the chunks itself: a stream's every read
    passes through it.)"""
    check = check or StreamCheck()
    splitter = splitter or EventSplitter()
    reader = aiter(chunks)
    deadline = None
    while True:
        try:
            chunk = await (anext(reader) if deadline is None else _within(reader, deadline))
        except StopAsyncIteration:  # the close, or neither it nor `[DONE]` came in time after the end
            if batch := check.filter(splitter.end()):
                yield batch
            break
        if batch := check.filter(splitter.feed(chunk)):
            yield batch
        if splitter.done:
            break
        if deadline is None and check.ended:
            deadline = asyncio.get_running_loop().time() + GRACE
    if splitter.said_done:
        check.saw_done()
    check.finish()


async def _within(reader: AsyncIterator[bytes], deadline: float) -> bytes:
    """The next chunk, if it comes by `deadline`; else StopAsyncIteration, as at the close."""
    try:
        async with asyncio.timeout_at(deadline):
            return await anext(reader)
    except TimeoutError:
        raise StopAsyncIteration from None
