"""A plain ZeroMQ socket driven by an asyncio loop through its file descriptor.

`zmq.asyncio` wraps every send and receive in futures and extra loop turns, which cost
tens of microseconds per hop; the client and the worker make several hops per request.
Here the loop calls `drain` when the socket's descriptor becomes readable, and `drain`
hands every waiting message to `on_message` at once; sends go out directly, from any
thread (under the lock). ZeroMQ's descriptor signals edges, not levels: a send may
swallow the edge of a message that arrived meanwhile, so every send checks for one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import zmq

from .zmqio import recv_frames, send_frames

_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


class LoopSocket:
    def __init__(self, sock: zmq.Socket, on_message: Callable[[list[bytes]], None]) -> None:
        self.sock = sock
        self.lock = threading.RLock()  # every use of the socket; hold it to do more under it
        self._on_message = on_message
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.FD, self.drain)
        loop.call_soon(self.drain)  # messages that arrived before the loop watched

    def detach(self) -> None:
        """No longer watched by its loop, which has stopped (another may attach); what arrives meanwhile waits."""
        with self.lock:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.sock.FD)
            self._loop = None

    def send(self, frames: list[bytes], flags: int = 0) -> None:
        """Send now (`flags`: 0, or NOBLOCK to raise zmq.Again rather than wait); safe from any thread."""
        with self.lock:
            send_frames(self.sock, frames, flags)
            pending = self.sock.getsockopt(_EVENTS) & _POLLIN
        if pending and self._loop is not None:
            self._loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        """Hand every waiting message to `on_message` (the loop calls this when readable)."""
        with self.lock:
            sock = self.sock
            while not sock.closed and sock.getsockopt(_EVENTS) & _POLLIN:  # `on_message` may replace it
                self._on_message(recv_frames(sock))

    def replace(self, sock: zmq.Socket) -> None:
        """Use `sock` from now on; the old socket is closed with whatever it still had to send."""
        with self.lock:
            old, self.sock = self.sock, sock
            if self._loop is not None:
                self._loop.remove_reader(old.FD)
                self._loop.add_reader(sock.FD, self.drain)
            old.close(0)

    def close(self) -> None:
        """Stop watching and close; call on the loop's thread."""
        with self.lock:
            if self._loop is not None and not self.sock.closed:
                self._loop.remove_reader(self.sock.FD)
            self.sock.close(0)
