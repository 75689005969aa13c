"""The broker's frontend as the request flow sees it: sending to callers, and parking the final
answers of a caller that stopped reading.

Between `gather` and `release`, what is sent to each caller goes to it as one message (the records
of a worker's message: a stream's head with its first events, its last events with its end); a send
then reports success before it is tried, and a failed one cuts the caller off as any send does.

A send never blocks. A caller that is gone (EHOSTUNREACH) or stopped reading (EAGAIN: `client_buffer`
messages wait for it) has its requests cancelled by the flow; one that stopped reading keeps its final
answers parked for `PARKED_FOR` seconds, so each of its requests still ends in one answer if it
resumes, while the broker's memory stays bounded.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import zmq

from ..protocol import Code, Codec, ErrorInfo, Kind, split
from ..protocol import Error as ErrorHeader
from ..wire.zmqio import NOBLOCK, send_frames
from .connections import Connections

log = logging.getLogger(__name__)

PARKED_FOR = 60.0  # how long answers wait for a client that stopped reading before they are dropped
_ENDS = (bytes([Kind.RESULT]), bytes([Kind.ERROR]))


class Callers:
    """Sends to callers over the frontend; `cut_off(client, why, now)` cancels a lost caller's requests."""

    def __init__(
        self,
        frontend: zmq.Socket,
        connections: Connections,
        codec: Codec,
        client_buffer: int,
        cut_off: Callable[[bytes, str, float], None],
    ) -> None:
        self.frontend = frontend
        self.connections = connections
        self.codec = codec
        self.client_buffer = client_buffer
        self.cut_off = cut_off
        self.sent = 0  # messages sent to callers
        self._gathered: dict[bytes, list[bytes]] | None = None  # records for each caller, while gathering

    def parked(self, client: bytes) -> bool:
        conn = self.connections.get(client)
        return conn is not None and conn.parked is not None

    def reply_error(self, client: bytes, rid: int, code: Code, message: str) -> None:
        if self.parked(client):  # it reads nothing: a refusal would only pile up behind its answers
            return
        info = self.codec.encode(ErrorInfo(code, message))
        self.send(client, self.codec.frames(Kind.ERROR, ErrorHeader(rid, code), info))

    def gather(self) -> None:
        """From now until `release`, each caller's messages are put together."""
        self._gathered = {}

    def release(self) -> None:
        """Send each caller what was gathered for it, as one message."""
        gathered, self._gathered = self._gathered, None
        for client, records in (gathered or {}).items():
            self._send(client, records)

    def send(self, client: bytes, frames: list[bytes]) -> bool:
        """Send to a caller; False if it is gone or stopped reading (its requests are then cancelled)."""
        conn = self.connections.get(client)
        if conn is not None and conn.parked is not None:
            if frames[0] in _ENDS:
                conn.parked.append(frames)
            return False
        if self._gathered is None:
            return self._send(client, frames)
        self._gathered.setdefault(client, []).extend(frames if len(frames) == 3 else [*frames, b""])
        return True

    def _send(self, client: bytes, frames: list[bytes]) -> bool:
        try:
            send_frames(self.frontend, [client, *frames], NOBLOCK)
            self.sent += 1
            return True
        except zmq.ZMQError as exc:
            self._lost(client, frames, gone=exc.errno == zmq.EHOSTUNREACH)  # the caller is gone (F11); else EAGAIN
            return False

    def _lost(self, client: bytes, frames: list[bytes], gone: bool) -> None:
        log.info("client %s %s: cancelling its requests", who(client), "went away" if gone else "stopped reading")
        now = time.monotonic()  # a send can fail anywhere an answer is sent: the one clock reading not passed down
        self.connections.park(client, None, now)
        for record in split(frames):  # its answers wait for it to read again
            if record[0] in _ENDS:
                self.connections.park(client, record, now)
        why = (
            "the caller went away"
            if gone
            else f"the caller stopped reading ({self.client_buffer} messages waiting; client_buffer)"
        )
        self.cut_off(client, why, now)
        if gone:
            self.connections.forget(client)

    def resend_parked(self, now: float) -> None:
        """Try again (once a second) to hand parked answers to callers that stopped reading."""
        for client, conn in self.connections.parked():
            answers = conn.parked
            while answers:
                try:
                    send_frames(self.frontend, [client, *answers[0]], NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:  # gone for good
                    answers.clear()
                    break
                answers.pop(0)
            if not answers:
                self.connections.unpark(client)
            elif now - conn.parked_at > PARKED_FOR:
                log.warning("client %s did not read for %gs: dropping %d answers for it",
                            who(client), PARKED_FOR, len(answers))  # fmt: skip
                self.connections.forget(client)


def who(client: bytes) -> str:
    """A client's name for the log: a hash of its routing id (the id itself would show the counter
    libzmq generates ids from, and let a reader of the log claim the next ones)."""
    return hashlib.blake2b(client, digest_size=4).hexdigest()
