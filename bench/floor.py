"""The references behind issue 21's "+0.3 ms" (run by `python -m bench shim` as two more paths): the
least a process boundary adds to an SDK call on this machine. `bare hop`: the official SDKs' HTTP
transport sends each request's bytes in one ZeroMQ message to another process, which makes the
request with aiohttp (as a worker does) and sends status, headers and the whole body back in one
message: no broker, no watchdog, no events relayed as they come, no retries. `bare broker`: the same
through a Python loop that only passes messages on between callers and that process, as the
pool's broker sits between callers and workers. Neither is a pool: what they add is a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import anthropic
import msgspec
import openai
import zmq

from broker.sdklib import library

from .owned import OwnedServer, first_line
from .sidebyside import REFERENCES, Clients, Path

HOP, BROKER = REFERENCES
_FRAMING = ("content-length", "transfer-encoding", "content-encoding")  # the answer goes back whole, decoded
_head = msgspec.msgpack.Encoder()
_read = msgspec.msgpack.Decoder()


def _transport(lib: Any, address: str) -> Any:
    """An httpx(2) transport sending each request to the relay at `address` and waiting for its answer."""

    class Hop(lib.BaseTransport):
        def __init__(self) -> None:
            self.sock = zmq.Context.instance().socket(zmq.DEALER)
            self.sock.connect(address)

        def handle_request(self, request: Any) -> Any:
            head = (request.method, str(request.url), list(request.headers.items()))
            self.sock.send_multipart((_head.encode(head), request.read()), copy=False)
            status, headers, body = self.sock.recv_multipart()
            return lib.Response(_read.decode(status), headers=_read.decode(headers), content=body)

        def close(self) -> None:
            self.sock.close(0)

    return Hop()


def path(name: str, address: str, servers: dict[str, Any]) -> Path:
    """The official SDKs to each upstream, their requests sent through the process at `address`."""

    def http_client(kind: str) -> Any:
        lib = library(kind)
        return lib.Client(transport=_transport(lib, address))

    def clients(upstream: str) -> Clients:
        url = servers[upstream].url
        claude = anthropic.Anthropic(base_url=url, max_retries=0, http_client=http_client("anthropic"))
        return Clients(claude, openai.OpenAI(base_url=url + "/v1", max_retries=0, http_client=http_client("openai")))

    return Path.of(name, clients)


async def _relay(address: str) -> None:
    """The process that holds the HTTP client: each request made with aiohttp (as a worker does), its
    whole answer sent back in one message, behind whatever envelope it came with."""
    import aiohttp
    import zmq.asyncio

    sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    sock.bind(address)
    _exit_with_stdin()
    print(address, flush=True)
    async with aiohttp.ClientSession() as session:
        while True:
            *envelope, head, body = await sock.recv_multipart()
            method, url, headers = _read.decode(head)
            async with session.request(method, url, data=body, headers=headers) as response:
                data = await response.read()
                kept = [(str(k), v) for k, v in response.headers.items() if k.lower() not in _FRAMING]
            await sock.send_multipart((*envelope, _head.encode(response.status), _head.encode(kept), data))


def _forward(front: str, back: str) -> None:
    """The least a broker can be: a Python loop passing each message on between callers and the relay."""
    ctx = zmq.Context.instance()
    callers, relay = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    callers.bind(front)
    relay.connect(back)
    poller = zmq.Poller()
    for sock in (callers, relay, sys.stdin):
        poller.register(sock, zmq.POLLIN)
    print(front, flush=True)
    while True:
        ready = dict(poller.poll())
        if callers in ready:
            relay.send_multipart(callers.recv_multipart(), copy=False)
        if relay in ready:
            callers.send_multipart(relay.recv_multipart(), copy=False)
        if sys.stdin.fileno() in ready and not sys.stdin.buffer.read1(4096):
            return


def _exit_with_stdin() -> None:
    """End this process when the bench closes its stdin (it is done, or died)."""
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.buffer.read1(4096) or os._exit(0))


@contextlib.contextmanager
def bare_paths(servers: dict[str, Any]) -> Iterator[tuple[list[Path], dict[str, list[int]]]]:
    """The SDKs through one bare process hop, and through a bare broker to it, and their processes' pids by
    role (the relay is the bare paths' worker)."""
    with tempfile.TemporaryDirectory() as tmp:
        relay, front = f"ipc://{tmp}/relay", f"ipc://{tmp}/broker"
        me = [sys.executable, "-m", "bench.floor"]
        with (
            OwnedServer([*me, "--relay", relay], first_line, "the bare relay", 30.0) as relay_process,
            OwnedServer([*me, "--forward", front, relay], first_line, "the bare broker", 30.0) as broker_process,
        ):
            pids = {"worker": [relay_process.pid], "broker": [broker_process.pid]}
            yield [path(HOP, relay, servers), path(BROKER, front, servers)], pids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--relay", help=argparse.SUPPRESS)
    parser.add_argument("--forward", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.relay:
        asyncio.run(_relay(args.relay))
    elif args.forward:
        _forward(*args.forward)
    else:
        parser.error("run as part of `python -m bench shim`")


if __name__ == "__main__":
    main()
