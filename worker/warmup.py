"""First calls run in the zygote before any fork, so that no worker's first real call pays for first use.

A forked worker's first call cost 10-20 ms more than its second (2 cores, quiet): the SDK builds its
request option models, the HTTP library its connection machinery, the worker's stream check its
decoders. That lands on exactly the calls that must be quick: the retry of a stalled stream runs on a
spare worker that has served nothing yet. So the zygote runs a streamed and a plain call of each SDK it
preloads through the same code a worker runs (`run_call`), against a provider of its own on a Unix
socket (nothing leaves the machine), and drops everything before it forks. What remains of a first
call's cost is the copy, after the fork, of the pages it writes (~9 ms on 2 busy cores): running the
warm-up again in each worker would pre-copy them at ~4.5 MB more per idle worker (6 -> 10.4 MB, `python
-m bench memory`), so only the replacement of a worker killed with requests does it (`warm_worker`): the
broker takes it for the next stall's retry before any fresh fork, and it holds what a worker that served
once holds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import struct
import threading
from typing import Any

from broker.sdklib import library

from . import sdks
from .calls import run_call

log = logging.getLogger(__name__)
_WARMED: set[str] = set()  # the SDK families this process has warmed up
_NAMES = itertools.count()  # of its providers' sockets

_ANTHROPIC = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_warm","type":"message",'
    b'"role":"assistant","model":"warm-up","content":[],"stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":1,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: ping\ndata: {"type":"ping"}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"ok"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":1}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)
_OPENAI = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"warm-up","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":"ok"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"warm-up","choices":[{"index":0,'
    b'"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"warm-up","choices":[],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)
# per SDK: the method a worker runs most, its arguments, and the stream the in-memory provider answers
_CALLS = {
    "anthropic": ("messages.create", {"model": "warm-up", "max_tokens": 1}, _ANTHROPIC),
    "openai": ("chat.completions.create", {"model": "warm-up"}, _OPENAI),
}


class _Discard:
    """An emitter that sends nothing: the warm-up's output has no reader."""

    async def _nothing(self, *_: Any) -> None:
        return None

    head = events = error_event = progress = ending = usage = result = error = _nothing


def warm_up(families: tuple[str, ...], tls: Any) -> None:
    """`calls`, before any fork, for the families not yet warmed in this process (the zygote preloads kind
    after kind, and a cloud kind's family is a first-party one's); one that fails (an SDK generation that
    builds its clients otherwise) costs the first calls their speed only."""
    families = tuple(family for family in families if family not in _WARMED)
    if not families:
        return
    _WARMED.update(families)
    before = set(threading.enumerate())
    try:
        asyncio.run(calls(families, tls))
    except Exception:
        log.warning("warming up %s failed; first calls will be slower", ", ".join(families), exc_info=True)
    for thread in set(threading.enumerate()) - before:  # an HTTP library's worker thread, told to stop with the loop
        thread.join(timeout=1.0)


async def warm_worker(family: str, tls: Any) -> None:
    """`calls` in a worker, once READY, beside its requests; one that fails costs its first call its speed only."""
    try:
        await calls((family,), tls)
    except Exception:
        log.warning("warming up %s failed; the first call will be slower", family, exc_info=True)


async def calls(families: tuple[str, ...], tls: Any = None) -> None:
    """One streamed and one plain (assembled) call per SDK family, on a throwaway client, against a
    provider on a Unix socket of this process. `tls`: the worker's TLS context, if it has one (a
    client building its own costs ~30 ms and megabytes, though the socket carries plain HTTP)."""
    answers: list[bytes] = []
    connections: set[asyncio.Task] = set()
    # an abstract socket name (Linux): no file to remove, even when the process is killed meanwhile
    path = f"\0isopool-warm-up-{os.getpid()}-{next(_NAMES)}"
    server = await asyncio.start_unix_server(lambda r, w: _answer(r, w, answers, connections), path)
    try:
        for family in families:
            method, args, stream = _CALLS[family]
            answers[:] = [stream]
            sdk = sdks.load(family)
            http = library(family)
            # a Unix socket: no name to resolve (a resolver's thread would outlive the loop, and the zygote forks)
            transport = http.AsyncHTTPTransport(uds=path, verify=tls or False)
            async with http.AsyncClient(transport=transport) as client:
                sdk_client = sdk.client(api_key="warm-up", base_url="http://warm-up.invalid", http_client=client)
                # as a broker's call comes: a prompt, and headers (its traceparent)
                args = {
                    **args,
                    "messages": [{"role": "user", "content": "warm-up"}],
                    "extra_headers": {"x-warm-up": "1"},
                }
                for streaming in (True, False):
                    await run_call(
                        sdk_client, family, sdk.resource_type, method, {**args, "stream": streaming}, _Discard()
                    )
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.gather(*connections)  # each ends at its client's close: none is left to be cancelled


async def _answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: list[bytes], connections: set[asyncio.Task]
) -> None:
    """Each request on the connection (read whole) answered with the current stream, kept alive. Only this
    process's: any local user can reach an abstract socket, and one that held a connection open would hold
    the warm-up (which waits for its connections to close) for ever."""
    if _peer_pid(writer) != os.getpid():
        writer.close()
        return
    connections.add(asyncio.current_task())  # type: ignore[arg-type]
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = next((int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                           if line.startswith(b"content-length:")), 0)  # fmt: skip
            await reader.readexactly(length)
            body = answers[0]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))  # fmt: skip
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _peer_pid(writer: asyncio.StreamWriter) -> int:
    """The process id of a Unix socket connection's other end."""
    sock = writer.get_extra_info("socket")
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
