"""AWS event-stream frames, written: what Bedrock streams (`application/vnd.amazon.eventstream`).

Only the encoder lives here (the fake provider writes Bedrock's streams with it); reading is
botocore's (worker/frames.py). A frame: total length and header length (big-endian u32), the CRC32
of those 8 bytes, headers (name length u8, name, type 7 = string, value length u16, value), the
payload, then the CRC32 of everything before it. Bedrock's `chunk` event carries an Anthropic event
as base64 JSON (`{"bytes": ..., "p": padding}`); an exception frame carries `{"message": ...}`.
"""

from __future__ import annotations

import base64
import struct
import zlib

import msgspec

CONTENT_TYPE = "application/vnd.amazon.eventstream"
_ENC = msgspec.json.Encoder()
_STRING = 7  # the header value type of a string


def _header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return struct.pack(">B", len(n)) + n + struct.pack(">BH", _STRING, len(v)) + v


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One frame with these string headers around `payload`."""
    head = b"".join(_header(k, v) for k, v in headers.items())
    prelude = struct.pack(">II", 16 + len(head) + len(payload), len(head))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event(kind: str, payload: bytes) -> bytes:
    """An event frame of type `kind` (Bedrock's answers are `chunk`; other types are not answer events)."""
    return frame({":event-type": kind, ":content-type": "application/json", ":message-type": "event"}, payload)


def chunk(data: bytes) -> bytes:
    """A `chunk` frame carrying `data` (an Anthropic event's JSON) as Bedrock does: base64, padded."""
    return event("chunk", _ENC.encode({"bytes": base64.b64encode(data).decode(), "p": "abcdefghijklmnopqrstu"}))


def exception(kind: str, message: str) -> bytes:
    """An exception frame, as Bedrock ends a stream it cannot finish (e.g. `modelStreamErrorException`)."""
    headers = {":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"}
    return frame(headers, _ENC.encode({"message": message}))
