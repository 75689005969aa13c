"""The references behind issue 21's "+0.3 ms" (run by `python -m bench shim` and `gateway` as more paths):
the least a process boundary adds to an SDK call on this machine. `bare hop`: the official SDKs' HTTP
transport sends each request's bytes in one ZeroMQ message to another process, which makes the
request with aiohttp (as a worker does) and sends status, headers and body back: a plain answer in
one message; a stream as the fewest messages a relay that streams can send, its first read at once
and, unless that read ended it, the rest in one more message at its end (a relay that held a whole
stream back until it ended would show its caller nothing until then). No broker, no watchdog, no
retries. `bare broker`: the same through a Python loop that only passes messages on between callers
and that process, as the pool's broker sits between callers and workers. `bare gateway` (gateway's
run): aiohttp's low-level server in front of the bare broker. None is a pool: what they add is a floor.

Each answer message is four frames: status, headers (both empty after the first), body, and `more`
(b"1" when another message of the same answer follows).
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
import zmq.asyncio

from broker.sdklib import library

from .owned import OwnedServer, first_line
from .sidebyside import REFERENCES, Clients, Path

HOP, BROKER, GATEWAY = REFERENCES
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
            status, headers, body, more = self.sock.recv_multipart()
            if not more:
                return lib.Response(_read.decode(status), headers=_read.decode(headers), content=body)
            return lib.Response(_read.decode(status), headers=_read.decode(headers), stream=Rest(self.sock, body))

        def close(self) -> None:
            self.sock.close(0)

    class Rest(lib.SyncByteStream):
        """A stream's body: what came with its head, then each message that follows, to the last."""

        def __init__(self, sock: zmq.Socket, first: bytes) -> None:
            self.sock, self.first, self.more = sock, first, True

        def __iter__(self) -> Iterator[bytes]:
            yield self.first
            while self.more:
                yield self._next()

        def _next(self) -> bytes:
            _, _, chunk, more = self.sock.recv_multipart()
            self.more = bool(more)
            return chunk

        def close(self) -> None:  # read to its end, so that the next answer on the socket is the next request's
            while self.more:
                self._next()

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

    sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    sock.bind(address)
    _exit_with_stdin()
    print(address, flush=True)
    async with aiohttp.ClientSession() as session:
        while True:
            *envelope, head, body = await sock.recv_multipart()
            method, url, headers = _read.decode(head)
            async with session.request(method, url, data=body, headers=headers) as response:
                kept = [(str(k), v) for k, v in response.headers.items() if k.lower() not in _FRAMING]
                status, answer = _head.encode(response.status), _head.encode(kept)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    await sock.send_multipart((*envelope, status, answer, await response.read(), b""))
                    continue
                chunks = response.content.iter_any()
                first = await anext(chunks, b"")
                ended = response.content.at_eof()
                await sock.send_multipart((*envelope, status, answer, first, b"" if ended else b"1"))
                if not ended:
                    await sock.send_multipart((*envelope, b"", b"", b"".join([c async for c in chunks]), b""))


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


async def _gateway(front: str, upstreams: dict[str, str]) -> None:
    """The least an HTTP gateway in front of the bare broker can be: aiohttp's low-level server (as the
    pool's gateway) taking `/UPSTREAM/path`, the request sent on whole, the answer given back as it came
    (a stream's each message written as it arrives)."""
    from aiohttp import web

    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.connect(front)
    turn = asyncio.Lock()  # one request at a time on the socket: the bench makes one call at a time

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        upstream, _, rest = request.raw_path.lstrip("/").partition("/")
        headers = [(str(k), v) for k, v in request.headers.items() if k.lower() not in ("host", *_FRAMING)]
        head = (request.method, f"{upstreams[upstream]}/{rest}", headers)
        body = await request.read()
        async with turn:
            await sock.send_multipart((_head.encode(head), body))
            status, answer, data, more = await sock.recv_multipart()
            if not more:
                return web.Response(status=_read.decode(status), headers=_read.decode(answer), body=data)
            response = web.StreamResponse(status=_read.decode(status), headers=_read.decode(answer))
            await response.prepare(request)
            await response.write(data)
            while more:
                _, _, data, more = await sock.recv_multipart()
                await response.write(data)
        await response.write_eof()
        return response

    runner = web.ServerRunner(web.Server(handle))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    _exit_with_stdin()
    print(f"http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def _exit_with_stdin() -> None:
    """End this process when the bench closes its stdin (it is done, or died)."""
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.buffer.read1(4096) or os._exit(0))


@contextlib.contextmanager
def bare_paths(servers: dict[str, Any], gateway: bool = False) -> Iterator[tuple[list[Path], dict[str, list[int]]]]:
    """The SDKs through one bare process hop and through a bare broker to it (with `gateway`: through a bare
    HTTP gateway in front of that broker instead), and their processes' pids by role (the relay is the bare
    paths' worker)."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        relay, front = f"ipc://{tmp}/relay", f"ipc://{tmp}/broker"
        me = [sys.executable, "-m", "bench.floor"]
        pids = {role: [stack.enter_context(OwnedServer([*me, *args], first_line, f"the {what}", 30.0)).pid]
                for role, what, args in (("worker", "bare relay", ["--relay", relay]),
                                         ("broker", "bare broker", ["--forward", front, relay]))}  # fmt: skip
        if not gateway:
            yield [path(HOP, relay, servers), path(BROKER, front, servers)], pids
            return
        urls = [f"{name}={server.url}" for name, server in servers.items()]
        http = stack.enter_context(OwnedServer([*me, "--gateway", front, *urls], first_line, "the bare gateway", 30.0))
        pids["gateway"] = [http.pid]
        yield [_at_gateway(http.url)], pids


def _at_gateway(url: str) -> Path:
    """The official SDKs at the bare gateway, each upstream under its name."""

    def clients(upstream: str) -> Clients:
        base = f"{url}/{upstream}"
        return Clients(anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0),
                       openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0))  # fmt: skip

    return Path.of(GATEWAY, clients)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--relay", help=argparse.SUPPRESS)
    parser.add_argument("--forward", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--gateway", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.relay:
        asyncio.run(_relay(args.relay))
    elif args.forward:
        _forward(*args.forward)
    elif args.gateway:
        front, *urls = args.gateway
        asyncio.run(_gateway(front, dict(url.split("=", 1) for url in urls)))
    else:
        parser.error("run as part of `python -m bench shim` or `python -m bench gateway`")


if __name__ == "__main__":
    main()
