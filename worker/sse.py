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


async def iter_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[tuple[str, bytes]]]:
    """The real events of a byte stream, as lists of those completed by each read (so a
    fast stream is relayed in few messages and a slow one without delay); stops at
    OpenAI's `data: [DONE]`."""
    tail = b""
    async for chunk in chunks:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        blocks = (tail + chunk).split(b"\n\n")
        tail = blocks.pop()
        batch = []
        for block in blocks:
            event = parse_block(block)
            if event is None:
                continue
            if event[1] == DONE:
                if batch:
                    yield batch
                return
            batch.append(event)
        if batch:
            yield batch
    if tail.strip() and (event := parse_block(tail)) is not None and event[1] != DONE:
        yield [event]
