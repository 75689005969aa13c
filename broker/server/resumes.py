"""A stream broken after output, continued instead of lost (opt-in: `continue_streams`).

The broker keeps what each opted-in stream delivered: the EVENT payloads as the worker sent them,
unparsed, up to `continue_max_bytes`. When the stream stalls or breaks after output, the request is
run again with a `Resume` payload (the original call and those events), and the next worker continues
it (worker/resume.py): by *prefill* (Anthropic text only: the delivered text sent back as an assistant
turn, only the rest streamed on) or by *replay* (the request run again, nothing forwarded until its
output has reproduced what was delivered, exactly). Every continuation is an attempt of the call's one
budget. When none works, the caller gets the error the stream first broke with, and why it was not
continued (`ErrorInfo.rescue`) — never a spliced answer that did not match.

Here: which requests keep their events, whether a failure may be continued and with which strategies
(`Rescue.after`, which the flow, and a router, ask), and the answer when it may not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from ..config import Settings
from ..protocol import CONTINUED_HEADER, Code, Continuation, ErrorInfo, Response, Resume, Submit
from ..routes import matching
from .state import Reason

# Failures after output that lose the stream but not the request: a stall, a lost worker or connection,
# a stream cut without its end or ended by an overloaded_error/api_error event (never forwarded); and,
# in a continuation attempt, a provider's retryable answer or silence.
_CONTINUED = frozenset(
    {Reason.STALE, Reason.HEARTBEAT, Reason.CRASH, Reason.MEMORY, Reason.NEIGHBOUR, Reason.CONNECTION,
     Reason.INCOMPLETE, Reason.ERROR_EVENT, Reason.HTTP_429, Reason.HTTP_5XX, Reason.HTTP_RETRYABLE, Reason.HEADERS,
     Reason.FIRST_EVENT}
)  # fmt: skip
_OUTCOMES = {
    Continuation.PREFILL_REFUSED: "refused",
    Continuation.REPLAY_DIVERGED: "diverged",
    Continuation.NOT_CONTINUABLE: "not_continuable",
}
_IMPLIED = {
    Continuation.PREFILL_REFUSED: "prefill",
    Continuation.REPLAY_DIVERGED: "replay",
    Continuation.NOT_CONTINUABLE: "none",
}
PREFILL_REFUSED_FOR = 3600.0  # seconds a model that refused prefill is continued by replay only
_ENC = msgspec.msgpack.Encoder()
_RESPONSE = msgspec.msgpack.Decoder(Response)


class Rescues:
    """The pool's side: which requests keep their events, and the models that refused prefill lately
    (for `PREFILL_REFUSED_FOR`: their broken streams go straight to replay, without paying a 400 each)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.refused: dict[tuple[str, str], float] = {}  # (profile, model) -> until when

    def start(self, sub: Submit, now: float) -> Rescue | None:
        """The continuation state of a new request, or None if its stream is not to be continued."""
        strategies = strategies_for(self.settings, sub.profile, sub.model) if sub.stream else []
        if self.refused.get((sub.profile, sub.model), 0.0) > now:
            strategies = [s for s in strategies if s != "prefill"]
        return Rescue(strategies, self.settings.continue_max_bytes) if strategies else None

    def after(self, rescue: Rescue, profile: str, model: str, failure: str, info: ErrorInfo, now: float) -> list[str]:
        """`Rescue.after`, noting a refused prefill of the model."""
        if failure == Continuation.PREFILL_REFUSED:
            self.refused[(profile, model)] = now + PREFILL_REFUSED_FOR
        return rescue.after(failure, info)


def strategies_for(settings: Settings, profile: str, model: str) -> list[str]:
    """The continuation strategies of a stream of `model` on `profile`: the most specific model rule
    that names some (the profile's, then the pool's), else the profile's. OpenAI has no prefill."""
    p = settings.profiles[profile]
    named = [r.continue_streams for r in matching(p.models, model) + matching(settings.models, model)]
    chosen = next((s for s in named if s is not None), p.continue_streams)
    return [s for s in dict.fromkeys(chosen) if s != "prefill" or p.family == "anthropic"]


@dataclass(slots=True)
class Rescue:
    """One opted-in stream's continuation state."""

    strategies: list[str]
    room: int  # bytes the kept events may still take
    log: list[bytes] | None = field(default_factory=list)  # None: no longer continuable
    first: ErrorInfo | None = None  # what the stream first broke with: the caller's answer if not continued
    why: str = ""  # why it was not continued
    strategy: str = ""  # what the running attempt continues with ("" for the original attempt)
    event: tuple[bytes, bytes | None] | None = None  # the provider's error event it broke with, and its end (flow.py)

    def keep(self, data: bytes) -> None:
        """Keep an EVENT payload the caller received."""
        if self.log is None:
            return
        self.room -= len(data)
        if self.room < 0:
            self.log, self.why = None, "its events outgrew continue_max_bytes"
        else:
            self.log.append(data)

    def payload(self, call: bytes) -> bytes:
        """The RUN payload of a continuation of `call` (the request's own payload)."""
        delivered = [msgspec.Raw(batch) for batch in self.log or ()]
        return _ENC.encode(Resume(msgspec.Raw(call), delivered, self.strategies))

    def started(self, head: bytes) -> None:
        """A continuation's HEAD came (never forwarded: the caller has the first one): note its strategy."""
        try:
            headers = dict(_RESPONSE.decode(head).headers)
        except ValueError:  # msgspec's decode errors are ValueErrors
            headers = {}
        self.strategy = headers.get(CONTINUED_HEADER, "")

    def tally(self, failure: str) -> str:
        """The stats key ("<strategy>:<outcome>") of a continuation attempt that failed with `failure`;
        "" for the attempt that first broke."""
        if self.first is None:
            return ""
        return f"{self.strategy or _IMPLIED.get(failure, 'unknown')}:{outcome(failure)}"  # type: ignore[call-overload]

    def after(self, failure: str, info: ErrorInfo) -> list[str]:
        """An attempt failed after output with `failure` (a Reason, or a worker's code about a
        continuation; `info` says what): the strategies to continue with, [] when the request ends."""
        broke, self.strategy = self.first is None, ""
        if broke:
            self.first = info
        outcome = _OUTCOMES.get(failure)  # type: ignore[call-overload]
        if failure == Continuation.PREFILL_REFUSED:
            self.strategies = [s for s in self.strategies if s != "prefill"]
            self.why = "the provider refused the prefill" + ("" if self.strategies else " and replay is off")
        elif outcome is not None:
            self.strategies, self.why = [], info.message
        elif failure not in _CONTINUED:  # not a break that loses only the stream: the caller's error as it is
            self.strategies, self.why = [], "" if broke else f"the continuation failed ({failure}): {info.message}"
        if self.log is None:
            self.strategies = []
        return self.strategies

    def answer(self, delivered: int, attempts: int, why: str = "") -> ErrorInfo:
        """The caller's error when the stream is not continued: the first one, with why not."""
        why = why or self.why
        first = self.first or ErrorInfo(Code.WORKER_LOST, "the stream broke after output")
        message = f"{first.message}; not continued: {why}" if why else first.message
        return msgspec.structs.replace(first, message=message, delivered=delivered, attempts=attempts, rescue=why)


def outcome(failure: str) -> str:
    """How a continuation attempt that failed with `failure` is counted in stats."""
    return _OUTCOMES.get(failure, str(failure))  # type: ignore[call-overload]
