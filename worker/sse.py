"""Server-sent events split from raw bytes, keeping each event's data as the provider's own bytes.

Pings (`event: ping`), comment lines (`: keep-alive`) and data-less blocks are not
events: they are dropped here, which is what makes a stream that only pings look stale.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

DONE = b"[DONE]"


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


class EventSplitter:
    """Raw bytes in, the real events they complete out; `done` once OpenAI's `data: [DONE]` or the
    end of the bytes has been seen."""

    __slots__ = ("tail", "done")

    def __init__(self) -> None:
        self.tail, self.done = b"", False

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        blocks = (self.tail + chunk).split(b"\n\n")
        self.tail = blocks.pop()
        batch = []
        for block in blocks:
            event = parse_block(block)
            if event is None:
                continue
            if event[1] == DONE:
                self.done = True
                break
            batch.append(event)
        return batch

    def end(self) -> list[tuple[str, bytes]]:
        """The bytes ended: the last event, if they ended without a blank line."""
        tail, self.tail = self.tail, b""
        done, self.done = self.done, True
        if done or not tail.strip() or (event := parse_block(tail)) is None or event[1] == DONE:
            return []
        return [event]


async def iter_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[tuple[str, bytes]]]:
    """The real events of a byte stream, as lists of those completed by each read (so a
    fast stream is relayed in few messages and a slow one without delay); stops at
    OpenAI's `data: [DONE]`."""
    splitter = EventSplitter()
    async for chunk in chunks:
        if batch := splitter.feed(chunk):
            yield batch
        if splitter.done:
            return
    if batch := splitter.end():
        yield batch
