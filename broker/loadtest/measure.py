"""One request's record, built from the ticks its worker sent (see `worker/timing.py`).

Times are `time.monotonic_ns()` values from the worker (when the bytes arrived) and from
the generator (when the request was due and when it was submitted); both read the same
machine-wide clock. Every record says how the request ended, in one of these classes:
ok, http_error (the server answered 4xx/5xx), stream_error (an `error` event mid-stream),
stall (no output for the stale timeout, or none before the first-event timeout: cut, and
counted with the token it stalled after), incomplete (the stream ended cleanly but without its
terminal event: cut short), connection, and pool (the pool refused or lost it).
"""

from __future__ import annotations

import array
from typing import Any

import msgspec

from ..errors import (
    AttemptsExhausted,
    DeadlineExceeded,
    ProviderConnectionError,
    RequestError,
    StreamIncomplete,
    StreamStalled,
)
from ..protocol import TICK, Tick, Usage

_TICK = msgspec.msgpack.Decoder(Tick)
_NS = 1e-9


class Measurement:
    """Collects one request's ticks; `record()` turns them into the JSON-able record."""

    def __init__(self, index: int, scheduled: int, submitted: int, input_tokens: int, requested: int) -> None:
        self.index, self.scheduled, self.submitted = index, scheduled, submitted
        self.input_estimate, self.requested = input_tokens, requested
        self.sent = self.head = self.first = self.last = 0
        self.status = 0
        # when each read with output arrived (ns) and its output deltas: flat arrays, not a tuple per
        # read, so that thousands of streams leave the garbage collector nothing to walk
        self.arrived, self.deltas = array.array("q"), array.array("q")
        self.tokens = 0
        self.output_tokens = self.input_tokens = self.cached_tokens = self.cache_creation_tokens = -1
        self.outcome, self.error = "ok", ""
        self.end = self.received = 0

    def tick(self, name: str, data: bytes) -> None:
        """A worker's tick (the fast path)."""
        if name != TICK:
            return
        tick = _TICK.decode(data)
        if tick.sent:
            self.sent, self.head, self.status = tick.sent, tick.t, tick.status
        self.observe(tick.t, tick.tokens, tick.output_tokens, tick.input_tokens, tick.error, tick.cached_tokens,
                     tick.cache_creation_tokens)  # fmt: skip

    def observe(self, t: int, tokens: int, output_tokens: int = -1, input_tokens: int = -1, error: str = "",
                cached_tokens: int = -1, cache_creation_tokens: int = -1) -> None:  # fmt: skip
        """Something arrived at `t`: `tokens` output deltas, usage once reported, a mid-stream error."""
        if tokens:
            self.first = self.first or t
            self.arrived.append(t)
            self.deltas.append(tokens)
            self.tokens += tokens
        self.last = t
        self.output_tokens = max(self.output_tokens, output_tokens)
        self.input_tokens = max(self.input_tokens, input_tokens)
        self.cached_tokens = max(self.cached_tokens, cached_tokens)
        self.cache_creation_tokens = max(self.cache_creation_tokens, cache_creation_tokens)
        if error and self.outcome == "ok":
            self.outcome, self.error = "stream_error", error

    def finish(self, now: int, status: int = 0, body: bytes = b"") -> None:
        """The call ended with a result (`status` and body only for a plain, non-stream answer).
        A stream ended when its last bytes reached the worker, not when the end was relayed."""
        self.end = self.last if self.last and not body else now
        self.received = now
        status = self.status or status  # the head tick's status is the server's own
        if status >= 400:
            self.outcome, self.error = "http_error", f"HTTP {status}"
        elif body:
            self.plain(now, *_usage(body))
        self.status = status

    def plain(self, now: int, output_tokens: int, input_tokens: int, cached_tokens: int = -1,
              cache_creation_tokens: int = -1) -> None:  # fmt: skip
        """A non-streaming answer arrived at `now`: the whole body is its first token."""
        self.first = self.first or self.head or now
        self.output_tokens, self.input_tokens = output_tokens, input_tokens
        self.cached_tokens, self.cache_creation_tokens = cached_tokens, cache_creation_tokens
        self.tokens = max(output_tokens, 0)

    def fail(self, now: int, exc: RequestError) -> None:
        if isinstance(exc, StreamStalled | AttemptsExhausted):
            outcome = "stall"
        elif isinstance(exc, DeadlineExceeded):
            outcome = "deadline"
        elif isinstance(exc, ProviderConnectionError):
            outcome = "connection"
        elif isinstance(exc, StreamIncomplete):
            outcome = "incomplete"
        else:
            outcome = "pool"
        self.end_with(now, outcome, str(exc))

    def end_with(self, now: int, outcome: str, error: str) -> None:
        self.end = self.received = now
        self.outcome, self.error = outcome, error

    def record(self, origin: int, point: int, warmup: bool, conversation: int = 0, turn: int = 0) -> dict[str, Any]:
        """The JSON record: times in seconds from `origin` (the run's start), durations in seconds."""

        def at(t: int) -> float | None:
            return round((t - origin) * _NS, 6) if t else None

        def span(a: int, b: int) -> float | None:
            return round((b - a) * _NS, 6) if a and b else None

        gaps = [0.0] * (self.deltas[0] - 1) if self.deltas else []
        for previous, t, n in zip(self.arrived[:-1], self.arrived[1:], self.deltas[1:], strict=True):
            gaps.append(round((t - previous) * _NS, 6))
            if n > 1:
                gaps.extend([0.0] * (n - 1))  # deltas that arrived in the same read
        output = self.output_tokens if self.output_tokens >= 0 else self.tokens
        ok = self.outcome == "ok"
        ttft, e2e = span(self.sent, self.first), span(self.sent, self.end)
        return {
            "id": self.index,
            "point": point,
            "conversation": conversation,
            "turn": turn,
            "warmup": warmup,
            "scheduled": at(self.scheduled),
            "submitted": at(self.submitted),
            "sent": at(self.sent),
            "first_token": at(self.first),
            "end": at(self.end),
            "received": at(self.received),  # when the generator had the end (relay and queueing included)
            "ttft": ttft,
            "ttft_from_schedule": span(self.scheduled, self.first),
            "e2e": e2e,
            "e2e_from_schedule": span(self.scheduled, self.end),
            "tpot": round((e2e - ttft) / (output - 1), 6) if ok and ttft is not None and e2e and output > 1 else None,
            "gaps": gaps,
            "output_tokens": output,
            "chunks": self.tokens,
            "input_tokens": self.input_tokens if self.input_tokens >= 0 else self.input_estimate,
            "requested_tokens": self.requested,
            "cached_tokens": self.cached_tokens if self.cached_tokens >= 0 else None,  # None: the server did not say
            "cache_creation_tokens": self.cache_creation_tokens if self.cache_creation_tokens >= 0 else None,
            "status": self.status,
            "outcome": self.outcome,
            "error": self.error,
            "stall": self._stall() if self.outcome == "stall" else None,
        }

    def _stall(self) -> dict[str, Any]:
        since = self.last or self.sent or self.submitted
        return {"after_tokens": self.tokens, "waited": round((self.end - since) * _NS, 6)}


class _Body(msgspec.Struct):
    usage: Usage | None = None


_BODY = msgspec.json.Decoder(_Body)


def _usage(body: bytes) -> tuple[int, int, int, int]:
    """(output, input, cached input, input written to the cache) tokens of a plain answer."""
    try:
        usage = _BODY.decode(body).usage
    except msgspec.DecodeError:
        return -1, -1, -1, -1
    if usage is None:
        return -1, -1, -1, -1
    return usage.output, usage.input, usage.cached, usage.cache_creation
