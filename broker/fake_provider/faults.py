"""Which fault a request gets, parsed from a spec such as `stall-ping:after=3,times=1`.

A fault is chosen by the `x-isopool-fault` header, by a model name ending in
`@<spec>` (e.g. `claude-fake@reset:after=5`), or by server-wide probabilities.
Header and model faults fire `times` times per conversation (the request body, less an
assistant turn that ends it: a prefilled continuation is of the same conversation; default
once), so that a retry or a continuation is served cleanly and can be checked; `unavailable`
instead fires for every request during its window, as a provider that is down does. With
`vary=true` the answer changes each time the conversation is served, as a sampling model's does.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import msgspec

FAULT_HEADER = "x-isopool-fault"
LATENCY_HEADER = "x-isopool-latency"

KINDS = {
    "stall-first": "no first event; `event: ping` (Anthropic) or `: ping` comments every `interval`",
    "stall-ping": "stall after `after` events while sending `event: ping` every `interval`",
    "stall-comment": "stall after `after` events while sending `: keep-alive` comments",
    "silent": "stall after `after` events with the connection open and silent",
    "drip": "send every event `gap` seconds apart (healthy if gap < stale_timeout)",
    "slow-first": "wait `delay` seconds before the first event, then stream normally",
    "reset": "reset the TCP connection after `after` events",
    "close": "close the connection cleanly after `after` events",
    "http-429": "answer 429 rate_limit_error; with `retry_after=S` a `retry-after: S` header, with "
    "`retry_after_ms=MS` a `retry-after-ms: MS` one (as OpenAI sends it); neither: no header",
    "http-500": "answer 500 api_error",
    "http-529": "answer 529 overloaded_error",
    "http-408": "answer 408 (a request timeout at the provider's edge), which the SDKs retry",
    "http-409": "answer 409 (a conflict, e.g. a lock timeout), which the SDKs retry",
    "http-400": "answer 400 invalid_request_error; any `http-*` fault with `should_retry=true|false` also "
    "sends `x-should-retry`, the provider's word on retrying that the SDKs obey",
    "error-event": "send a mid-stream `error` event after `after` events, of type `error` (default "
    "overloaded_error; e.g. api_error, invalid_request_error)",
    "unavailable": "answer 503 to every request with this spec for `for` seconds from the first one "
    "(per fake process; `reset` starts it again), then serve normally: a provider down for a while",
    "no-headers": "accept the request and never answer: no status line, no headers, until the client leaves",
    "cut": "stream the answer up to its ending (or its first `after` events), then end the response "
    "cleanly without the terminal event: no message_stop, finish_reason/usage/[DONE] or response.completed",
    "no-done": "stream the whole answer but not Chat Completions' `data: [DONE]`, then end the response; "
    "with `open=true` keep the connection open and silent instead (any API)",
    "malformed": "after `after` events, one `data:` line that is not JSON (the next event cut in half); "
    "the rest of the stream intact",
    "context-length": "answer 400 with the provider's context-length error: Anthropic `prompt is too long: "
    "N tokens > M maximum`, OpenAI `context_length_exceeded`; M is `limit` (default 200000 / 128000)",
    "content-filter": "OpenAI: answer 400 with Azure OpenAI's `content_filter` body; Anthropic has no "
    "such 400: a 200 answer that stops with `stop_reason: refusal`",
}


class Fault(msgspec.Struct, frozen=True):
    kind: str
    after: int | None = None  # events before the fault: 3 unless given (`cut`: the whole answer but its end)
    interval: float = 1.0
    gap: float = 0.5
    delay: float = 1.0
    retry_after: float | None = None
    retry_after_ms: int | None = None
    times: int = 1
    hold: float = 600.0  # the longest a stall holds its connection open
    window: float = msgspec.field(default=5.0, name="for")  # seconds an `unavailable` provider stays down
    open: bool = False  # `no-done`: keep the connection open after the answer
    limit: int = 0  # `context-length`: the model's context window (0: the provider's usual one)
    vary: bool = False  # every serve of the conversation gets another answer (a replay diverges)
    error: str = "overloaded_error"  # `error-event`: the error's type
    should_retry: str = ""  # `http-*`: the `x-should-retry` header's value (none if empty)

    @property
    def stalls(self) -> bool:
        return self.kind in ("stall-first", "stall-ping", "stall-comment", "silent")

    @property
    def http_status(self) -> int | None:
        return int(self.kind[5:]) if self.kind.startswith("http-") else 503 if self.kind == "unavailable" else None

    @property
    def before(self) -> int:
        """Events sent before the fault strikes."""
        return 3 if self.after is None else self.after


def parse_params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {item!r}")
        params[key.strip()] = value.strip()
    return params


def parse_fault(spec: str) -> Fault:
    """`kind[:key=value,...]` -> Fault; ValueError with the list of kinds when unknown."""
    kind, _, params = spec.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown fault {kind!r}; known: {', '.join(KINDS)}")
    try:
        return msgspec.convert({"kind": kind, **parse_params(params)}, Fault, strict=False)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ValueError(f"bad fault spec {spec!r}: {exc}") from None


def _spec(header: str | None, model: str) -> str:
    """A request's fault spec: its header's, else its model name's after `@`."""
    return header or (model.partition("@")[2] if "@" in model else "")


class FaultPlan:
    """Decides each request's fault and counts what it injected."""

    def __init__(self, rates: dict[str, float] | None = None, seed: int = 0) -> None:
        self.rates = {parse_fault(spec): rate for spec, rate in (rates or {}).items()}
        self._rng = random.Random(seed)
        self._fired: Counter[tuple[str, Fault]] = Counter()
        self._down_since: dict[Fault, float] = {}  # when each `unavailable` spec first struck
        self.injected: Counter[str] = Counter()

    def choose(self, header: str | None, model: str, body_key: str) -> Fault | None:
        spec = _spec(header, model)
        if spec:
            fault = parse_fault(spec)
            if fault.kind == "unavailable":
                return fault if self._down(fault) else None
            if self._fired[(body_key, fault)] >= fault.times:
                return None
            self._fired[(body_key, fault)] += 1
            return fault
        draw = self._rng.random()
        for fault, rate in self.rates.items():
            if draw < rate:
                return fault if fault.kind != "unavailable" or self._down(fault) else None
            draw -= rate
        return None

    @staticmethod
    def varies(header: str | None, model: str) -> bool:
        """Whether the request's fault asks for an answer that changes with each serve (`vary=true`)."""
        spec = _spec(header, model)
        return bool(spec) and parse_fault(spec).vary

    def _down(self, fault: Fault) -> bool:
        """Whether an `unavailable` provider is still down: for `for` seconds from its first request."""
        now = time.monotonic()
        return now - self._down_since.setdefault(fault, now) < fault.window

    def reset(self) -> None:
        """Forget what was injected: a header or model fault fires again for a body it fired for."""
        self._fired.clear()
        self._down_since.clear()
        self.injected.clear()

    def record(self, fault: Fault) -> None:
        self.injected[fault.kind] += 1
