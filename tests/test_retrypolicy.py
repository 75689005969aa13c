"""The retry policy's decisions, as pure functions (the processes are tested in test_retry.py)."""

from __future__ import annotations

import email.utils
import time

import pytest

from broker.server.retrypolicy import Policy, classify, retry_after
from broker.server.state import Reason

POLICY = Policy(max_attempts=3, retry_backoff=0.02, http_retry_backoff=0.5, retry_after_max=60.0)


@pytest.mark.parametrize(
    ("status", "headers", "reason"),
    [
        (429, [], Reason.HTTP_429),
        (500, [], Reason.HTTP_5XX),
        (502, [], Reason.HTTP_5XX),
        (503, [], Reason.HTTP_5XX),
        (504, [], Reason.HTTP_5XX),
        (529, [], Reason.HTTP_5XX),
        (503, [("X-Should-Retry", "false")], None),
        (408, [], Reason.HTTP_RETRYABLE),
        (409, [], Reason.HTTP_RETRYABLE),
        (409, [("x-should-retry", "false")], None),
        (400, [("x-should-retry", "true")], Reason.HTTP_RETRYABLE),
        (400, [], None),
        (401, [], None),
        (403, [], None),
        (404, [], None),
        (422, [], None),
        (501, [], None),
    ],
)
def test_which_statuses_are_retried(status, headers, reason):
    assert classify(status, headers)[0] is reason


def test_retry_after_is_read_as_the_sdks_read_it():
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after({"retry-after": date}) <= 30  # type: ignore[operator]
    assert classify(429, [("Retry-After", "3")]) == (Reason.HTTP_429, 3.0)


def test_the_budget_ends_retries():
    assert POLICY.next_delay(Reason.HTTP_5XX, 3, [], 100, None, 0.5)[0] is None
    assert POLICY.next_delay(Reason.HTTP_5XX, 1, [], 100, None, 0.5, max_attempts=1)[0] is None
    assert POLICY.next_delay(Reason.HTTP_5XX, 2, [], 100, None, 0.5, max_attempts=5)[0] is not None


def test_provider_failures_back_off_and_kills_retry_at_once():
    first, _ = POLICY.next_delay(Reason.HTTP_5XX, 1, [], 100, None, 0.0)
    second, _ = POLICY.next_delay(Reason.HTTP_5XX, 2, [], 100, None, 0.0)
    assert (first, second) == (0.5, 1.0)
    assert POLICY.next_delay(Reason.CRASH, 1, [], 100, None, 0.0)[0] == 0.0


def test_retry_after_is_honoured_up_to_its_cap_and_the_deadline():
    assert POLICY.next_delay(Reason.HTTP_429, 1, [], 100, 7.0, 0.5)[0] == 7.0
    delay, why = POLICY.next_delay(Reason.HTTP_429, 1, [], 100, 61.0, 0.5)
    assert delay is None and "retry_after_max" in why
    delay, why = POLICY.next_delay(Reason.HTTP_429, 1, [], 5.0, 7.0, 0.5)
    assert delay is None and "deadline" in why


def test_a_silent_provider_is_retried_once():
    assert POLICY.next_delay(Reason.HEADERS, 1, [], 100, None, 0.5)[0] == 0.0
    assert POLICY.next_delay(Reason.HEADERS, 2, [Reason.HEADERS], 100, None, 0.5)[0] is None
    assert POLICY.next_delay(Reason.FIRST_EVENT, 2, [Reason.HEADERS], 100, None, 0.5)[0] is None
    assert POLICY.next_delay(Reason.HTTP_5XX, 2, [Reason.HEADERS], 100, None, 0.5)[0] is not None
