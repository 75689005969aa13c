"""Turn-taking between a `Client`'s threads: whichever waits for an answer reads the socket for all.

A loop thread reading the socket and handing each answer to the waiting thread costs every call
two thread wake-ups more than the caller reading it itself (on two busy cores, a few hundred µs).
So the threads waiting take turns: one reads (it waits on the socket, hands every message to its
call's sink), the others wait on their own sinks, woken by an answer or by being handed the
reader's role when the reader has its own answer and stops reading. Nobody reads when nobody
waits: answers stay queued in ZeroMQ until a thread asks for one.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any


class ThreadSink:
    """One call's answers for a `Client`: put by the thread that reads, taken by the call's own."""

    __slots__ = ("items", "waiter", "busy")

    def __init__(self) -> None:
        self.items: deque = deque()
        self.waiter: threading.Event | None = None  # set while its thread waits, to wake it
        self.busy = False  # a thread is taking from it

    def put(self, item: Any) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None:
            waiter.set()

    def empty(self) -> bool:
        return not self.items

    def get_nowait(self) -> Any:
        return self.items.popleft()


class Readers:
    """Who reads now. `read` is one reader's round: wait for input (a bounded while) and hand out
    what came, to any call's sink."""

    def __init__(self, read: Callable[[], None]) -> None:
        self._read = read
        self._mu = threading.Lock()
        self._reader: ThreadSink | None = None  # whose thread reads now
        self._reader_thread = 0  # and which thread that is
        self._waiting: list[ThreadSink] = []  # threads that wait, each on its own sink
        self._idle = threading.Condition(self._mu)  # notified when nobody reads
        self._stopped: BaseException | None = None  # why nobody reads any more

    def next(self, sink: ThreadSink) -> Any:
        """The sink's next item, reading for every waiting thread whenever nobody else does."""
        with self._mu:
            if sink.busy:
                raise RuntimeError("another thread is already reading this call: read each call from one thread")
            sink.busy = True
        try:
            while not sink.items:
                if self._turn(sink):
                    try:
                        while not sink.items:
                            if self._stopped is not None:  # closed by this very thread (a signal handler)
                                raise self._stopped
                            self._read()
                    finally:
                        self._hand_on()
            return sink.items.popleft()
        finally:
            sink.busy = False

    def _turn(self, sink: ThreadSink) -> bool:
        """Take the reader's role if it is free; else wait until the sink has an answer (False) or the
        role is handed to it (True)."""
        with self._mu:
            if self._stopped is not None and not sink.items:
                raise self._stopped
            if self._reader is None and self._stopped is None:
                self._reader, self._reader_thread = sink, threading.get_ident()
                return True
            sink.waiter = woken = threading.Event()
            self._waiting.append(sink)
        try:
            if not sink.items:
                woken.wait()
        except BaseException:  # Ctrl-C while waiting: a role handed meanwhile goes on to another
            if self._leave(sink):
                self._hand_on()
            raise
        return self._leave(sink)

    def _leave(self, sink: ThreadSink) -> bool:
        """Stop waiting; whether the role was handed to this sink's thread."""
        with self._mu:
            sink.waiter = None
            if self._reader is sink:
                self._reader_thread = threading.get_ident()
                return True
            self._waiting.remove(sink)
            return False

    def _hand_on(self) -> None:
        """The reader stops: the role goes to a thread still without an answer, if any (those with
        one were woken by it)."""
        with self._mu:
            self._reader, self._reader_thread = None, 0  # a thread handed the role names itself as it wakes
            if self._stopped is None:
                for other in self._waiting:
                    if not other.items:
                        self._waiting.remove(other)
                        self._reader = other
                        other.waiter.set()  # type: ignore[union-attr]
                        return
            self._idle.notify_all()

    def stop(self, why: BaseException, wake: Callable[[], None]) -> None:
        """Nobody reads again (the client is closing; a thread that waits then gets `why`): `wake` the
        reader, wait until it has stopped (unless this is the reader's own thread: a signal handler
        that closes the client while its thread reads)."""
        with self._mu:
            self._stopped = why
            while self._reader is not None and self._reader_thread != threading.get_ident():
                wake()
                self._idle.wait(0.1)
