"""The request log (setting `request_log`): one JSON line per finished request, written off the
broker's loop and rotated by size.

A line says who asked (a hash of the connection, never a key; the gateway token's name for a
gateway's caller), what (profile and model; the messages and the answer's text only with
`request_log_content`), what happened to each attempt (where it ran, when it started, its first event, how it
ended, the tokens its provider reported) and how the request ended, with the tokens of all its
attempts (and their cost, with a price table). The standard library's `QueueListener` writes from its own
thread into a `RotatingFileHandler`, so a slow or full disk never holds up the broker: a line
that cannot be queued or written is counted (`request_log_lost` in the stats) and the broker
goes on.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import time
from typing import Any

import msgspec

from ..protocol import Tokens
from . import genai

log = logging.getLogger(__name__)

_QUEUED = 10_000  # lines waiting for the writer thread; more are dropped and counted
_WARN_EVERY = 60.0  # seconds between warnings about lines lost


class AttemptLine(msgspec.Struct, frozen=True):
    deployment: str  # the worker group: the profile, or `profile.deployment`
    model: str
    started: float  # seconds after the request was accepted
    first_event: float | None  # seconds after the attempt started (None: it had none)
    took: float
    outcome: str  # ok, a stall or failure reason (first_event_timeout, http_429, ...), or how the request ended
    usage: Tokens | None = None  # what its provider reported (None: nothing, e.g. a stall before output)


class RequestLine(msgspec.Struct, frozen=True):
    time: str  # when it ended, UTC
    request: int  # the broker's id (as `isopool top` and the broker's log name it)
    client: str  # a hash of the caller's connection
    profile: str
    model: str
    answered_by: str  # profile/model of its last attempt
    status: str  # ok, error:<code>, cancelled
    attempts: list[AttemptLine]
    delivered: int  # events its caller had
    took: float
    usage: Tokens | None = None  # of all its attempts
    caller: str = ""  # who the caller said it is: a gateway's token, by name ("": a caller that said none)
    content: Content | None = None  # with request_log_content


class Content(msgspec.Struct, frozen=True):
    """The request's messages and its answer's text, in the GenAI conventions' shape (genai.py), bounded."""

    input: list[dict]
    system: list[dict]
    output: list[dict]


def content(req: Any) -> Content:
    """A request's messages and the text its last attempt answered (with request_log_content)."""
    messages, system = genai.input_content(req.payload)
    output = req.output.messages(req.spent.finish_reasons if req.spent else []) if req.output else []
    return Content(messages, system, output)


class _Handler(logging.handlers.RotatingFileHandler):
    """Counts the lines it could not write (a full disk, a removed directory) instead of printing a
    traceback for each, and warns at most once a minute."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        self.lost = 0
        self._warned = 0.0

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.lost += 1
        if time.monotonic() - self._warned > _WARN_EVERY:
            self._warned = time.monotonic()
            log.warning("request log %s: a line could not be written (%d lost so far)", self.baseFilename, self.lost)


class RequestLog:
    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self._handler = _Handler(path, max_bytes, backups)
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.Queue[logging.LogRecord] = queue.Queue(_QUEUED)
        self._listener = logging.handlers.QueueListener(self._queue, self._handler)
        self._listener.start()
        self._dropped = 0
        self._encode = msgspec.json.Encoder().encode

    @property
    def lost(self) -> int:
        """Lines not written: dropped while the writer was behind, or failed to write."""
        return self._dropped + self._handler.lost

    def write(self, line: RequestLine) -> None:
        record = logging.makeLogRecord({"msg": self._encode(line).decode(), "levelno": logging.INFO})
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._dropped += 1

    def close(self) -> None:
        """Write what is queued, then stop the writer thread (a last flush that fails, a full disk, is a
        line lost, never an error of the broker's shutdown)."""
        self._listener.stop()
        try:
            self._handler.close()
        except OSError:
            self._handler.lost += 1
