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
Their processes, and the messages they exchange, are in bench/floor_serve.py.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import zmq

from broker.sdklib import library

from .floor_serve import pack, unpack
from .owned import OwnedServer, first_line
from .sidebyside import REFERENCES, Clients, Path

HOP, BROKER, GATEWAY = REFERENCES


def _transport(lib: Any, address: str) -> Any:
    """An httpx(2) transport sending each request to the relay at `address` and waiting for its answer."""

    class Hop(lib.BaseTransport):
        def __init__(self) -> None:
            self.sock = zmq.Context.instance().socket(zmq.DEALER)
            self.sock.connect(address)

        def handle_request(self, request: Any) -> Any:
            head = (request.method, str(request.url), list(request.headers.items()))
            self.sock.send_multipart((pack(head), request.read()), copy=False)
            status, headers, body, more = self.sock.recv_multipart()
            if not more:
                return lib.Response(unpack(status), headers=unpack(headers), content=body)
            return lib.Response(unpack(status), headers=unpack(headers), stream=Rest(self.sock, body))

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


@contextlib.contextmanager
def bare_paths(servers: dict[str, Any], gateway: bool = False) -> Iterator[tuple[list[Path], dict[str, list[int]]]]:
    """The SDKs through one bare process hop and through a bare broker to it (with `gateway`: through a bare
    HTTP gateway in front of that broker instead), and their processes' pids by role (the relay is the bare
    paths' worker)."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        relay, front = f"ipc://{tmp}/relay", f"ipc://{tmp}/broker"
        me = [sys.executable, "-m", "bench.floor_serve"]
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
