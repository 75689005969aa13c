"""The bare references' own processes (bench/floor.py starts them): the relay holding the HTTP client, the
bare broker passing messages on, and the bare gateway. Apart from floor.py so that they import neither SDK
(an SDK import is seconds of CPU; these processes never build an SDK client).

Each answer message is four frames: status, headers (both empty after the first), body, and `more`
(b"1" when another message of the same answer follows).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import msgspec
import zmq
import zmq.asyncio

_FRAMING = ("content-length", "transfer-encoding", "content-encoding")  # the answer goes back whole, decoded
pack = msgspec.msgpack.Encoder().encode
unpack = msgspec.msgpack.Decoder().decode


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
            method, url, headers = unpack(head)
            async with session.request(method, url, data=body, headers=headers) as response:
                kept = [(str(k), v) for k, v in response.headers.items() if k.lower() not in _FRAMING]
                status, answer = pack(response.status), pack(kept)
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
            await sock.send_multipart((pack(head), body))
            status, answer, data, more = await sock.recv_multipart()
            if not more:
                return web.Response(status=unpack(status), headers=unpack(answer), body=data)
            response = web.StreamResponse(status=unpack(status), headers=unpack(answer))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_serve", description=__doc__,
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
