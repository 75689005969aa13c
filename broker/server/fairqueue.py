"""The queue of one provider profile, fair between client connections.

Requests wait in one FIFO per client connection, and free worker slots are handed to the
connections in turn: a caller who queued ten thousand requests delays another caller's
request by one turn, not by ten thousand. Retries go back to the front of their caller's
FIFO (they were first once already).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

from .state import Request


class FairQueue:
    def __init__(self) -> None:
        self._lines: dict[bytes, collections.deque[Request]] = {}  # client -> its waiting requests
        self._turns: collections.deque[bytes] = collections.deque()  # clients with requests, next first
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Request]:
        for line in self._lines.values():
            yield from line

    def push(self, req: Request, *, front: bool = False) -> None:
        line = self._lines.get(req.client)
        if line is None:
            line = self._lines[req.client] = collections.deque()
            (self._turns.appendleft if front else self._turns.append)(req.client)
        (line.appendleft if front else line.append)(req)
        req.queued = True
        self._len += 1

    def pop(self, now: float) -> Request | None:
        """The first request of the next client whose first request may run now (`not_before`)."""
        for _ in range(len(self._turns)):
            client = self._turns[0]
            line = self._lines[client]
            if line[0].not_before <= now:
                req = line.popleft()
                self._turns.popleft()
                if line:
                    self._turns.append(client)
                else:
                    del self._lines[client]
                req.queued = False
                self._len -= 1
                return req
            self._turns.rotate(-1)
        return None

    def remove(self, req: Request) -> None:
        line = self._lines[req.client]
        line.remove(req)
        if not line:
            del self._lines[req.client]
            self._turns.remove(req.client)
        req.queued = False
        self._len -= 1

    def clear(self) -> list[Request]:
        """Take every waiting request out, oldest caller first."""
        taken = [req for client in self._turns for req in self._lines[client]]
        for req in taken:
            req.queued = False
        self._lines.clear()
        self._turns.clear()
        self._len = 0
        return taken

    def next_due(self, now: float) -> float:
        """When something here next needs the watchdog: the earliest deadline, or a retry's end of
        backoff. A request free to run waits for a worker slot, whose freeing wakes the loop anyway."""
        due = float("inf")
        for line in self._lines.values():
            first = line[0].not_before
            due = min(due, first if first > now else due, min(r.deadline_at for r in line))
        return due
