"""The pool's one retry policy: which failures of an unseen call are retried, and after how long.

Every path (the low-level client, the shim, the gateway, batch) runs its calls through the broker,
and the workers' SDK clients retry nothing themselves (max_retries=0), so a call has one budget:
its `max_attempts` and its deadline. Attempts never multiply.

    failure before output                 retried? (reason)               delay
    HTTP 429                              yes (`http_429`)                its Retry-After / retry-after-ms, else
                                                                          backoff; one over retry_after_max or past
                                                                          the deadline ends the call with the 429
    HTTP 500, 502, 503, 504, 529          yes (`http_5xx`)                same
    HTTP 408, 409; `x-should-retry: true` yes (`http_retryable`), as the     same
      on any status                         SDKs retry them
    connection reset or refused           yes (`provider_connection`)     backoff from `http_retry_backoff`
    no headers within headers_timeout     once per call                   none (a fresh worker)
    no first event, first_event_timeout   once per call (with the above)  none
    other stalls, a lost worker, a        yes                             none, then from `retry_backoff`
      stream cut without its end
    an `error` event in the stream:       yes (`error_event`)             backoff from `http_retry_backoff`
      overloaded_error, api_error,
      rate_limit_error, server_error
      (another type: never)
    other 4xx (400, 401, 403, 404, 422)   never
    `x-should-retry: false` on any        never (the provider says so)

The broker asks `classify` about a provider's error answer and `next_delay` about every failure;
a fallback or a circuit breaker can ask the same questions.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from .state import Reason
from .watchdog import retry_delay

RETRIED_STATUS = frozenset({500, 502, 503, 504, 529})
_BACKOFF_CAP = 8.0  # the longest backoff between provider retries without a Retry-After (the SDKs' own cap)
# Silence (no headers, no first event): a provider that says nothing twice will not say more a third time.
SILENT = frozenset({Reason.HEADERS, Reason.FIRST_EVENT})
# Failures the provider answered or caused: backed off, never retried at once.
_PROVIDER = frozenset({Reason.HTTP_429, Reason.HTTP_5XX, Reason.HTTP_RETRYABLE, Reason.CONNECTION, Reason.ERROR_EVENT})
# The types of a mid-stream error event that say the provider failed, not the request: Anthropic's
# `overloaded_error`, `api_error` and `rate_limit_error` (its 529, 500 and 429), OpenAI's `server_error`,
# and Bedrock's exception frames of the same kinds (AWS: "retry your request").
RETRIED_EVENTS = frozenset({"overloaded_error", "api_error", "rate_limit_error", "server_error",
                            "serviceUnavailableException", "internalServerException", "throttlingException",
                            "modelStreamErrorException"})  # fmt: skip
_JSON = msgspec.json.Decoder()


def classify(status: int, headers: Iterable[tuple[str, str]]) -> tuple[Reason | None, float | None]:
    """A provider's HTTP error answer: the reason it is retried for (None: never retried) and the
    wait it asked for (Retry-After, in seconds; None if it named none)."""
    named = {k.lower(): v for k, v in headers}
    after = retry_after(named)
    should_retry = named.get("x-should-retry", "").strip().lower()
    if should_retry == "false":
        return None, after
    if status == 429:
        return Reason.HTTP_429, after
    if status in RETRIED_STATUS:
        return Reason.HTTP_5XX, after
    return (Reason.HTTP_RETRYABLE if status in (408, 409) or should_retry == "true" else None), after


def classify_event(body: bytes | None) -> Reason | None:
    """A provider's mid-stream error event (its JSON: Anthropic's `{"error": {"type"}}`, Chat
    Completions' `{"error": {"type", "code"}}`, Responses' `{"code"}`): the reason it is retried for,
    or None for a type that refuses the request (invalid_request_error, ...) and is never retried."""
    try:
        event = _JSON.decode(body or b"")
    except msgspec.DecodeError:
        return None
    error = event.get("error", event) if isinstance(event, dict) else None
    if not isinstance(error, dict):
        return None
    return Reason.ERROR_EVENT if {error.get("type"), error.get("code")} & RETRIED_EVENTS else None


def retry_after(headers: dict[str, str]) -> float | None:
    """Seconds from `retry-after-ms`, else `retry-after` (seconds or an HTTP date), as the SDKs read them:
    a wait that is not positive (0, negative, a date passed) is none, and the backoff applies."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            seconds = float(headers[name]) / scale
        except (KeyError, ValueError):
            continue
        if not math.isnan(seconds):
            return seconds if seconds > 0 else None
    date = email.utils.parsedate_tz(headers.get("retry-after", ""))
    seconds = None if date is None else email.utils.mktime_tz(date) - time.time()
    return seconds if seconds is not None and seconds > 0 else None


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings the policy reads (see the README's configuration table)."""

    max_attempts: int
    retry_backoff: float  # a lost worker or a stall: the first retry at once, then from this base
    http_retry_backoff: float  # a provider's error or a lost connection: from this base, capped at 8 s
    retry_after_max: float  # a longer Retry-After is not waited out

    def next_delay(
        self,
        reason: Reason,
        attempt: int,
        before: Iterable[str],
        seconds_left: float,
        after: float | None,
        jitter: float,
        max_attempts: int | None = None,
    ) -> tuple[float | None, str]:
        """(seconds before the next attempt, or None when the call ends now; why it ends) after attempt
        number `attempt` failed for `reason`. `before`: the reasons of the attempts before it;
        `seconds_left`: until the call's deadline; `after`: the provider's Retry-After; `jitter`: a
        uniform draw in [0, 1)."""
        budget = max_attempts or self.max_attempts
        if reason in SILENT and any(r in SILENT for r in before):
            return None, "a silent provider is retried once"
        if attempt >= budget:
            return None, f"max_attempts ({budget}) reached"
        if after is not None and after > self.retry_after_max:
            return None, f"Retry-After of {after:g}s is over retry_after_max ({self.retry_after_max:g}s)"
        if after is not None:
            delay = after
        elif reason in _PROVIDER:
            delay = min(_BACKOFF_CAP, self.http_retry_backoff * 2 ** (attempt - 1)) * (1 - 0.25 * jitter)
        else:
            delay = retry_delay(attempt + 1, self.retry_backoff, 5.0, jitter)
        if delay >= seconds_left:
            return None, f"the deadline passes in {seconds_left:.1f}s, before a retry in {delay:.1f}s"
        return delay, ""
