"""The watchdog's timing rules, decided without processes."""

from __future__ import annotations

import pytest

from broker.protocol import Submit
from broker.server.state import Reason, Request, Worker, WorkerState
from broker.server.watchdog import request_due, retry_delay, worker_due


def running(sent=100.0, last=None, fet=10.0, stale=2.0, deadline_at=1000.0) -> Request:
    req = Request(1, b"c", 1, Submit(1), b"", "p", fet, stale, deadline_at, 90.0)
    req.sent_at, req.last_event_at = sent, last
    return req


def test_first_event_timeout_counts_from_send():  # headers_timeout is off (inf) in these requests
    assert request_due(running(sent=100.0)) == (110.0, Reason.FIRST_EVENT)


def test_stale_timeout_counts_from_last_real_event():
    assert request_due(running(last=105.0)) == (107.0, Reason.STALE)


def test_an_event_pushes_the_stale_deadline_forward():
    req = running(last=105.0)
    req.last_event_at = 106.5
    assert request_due(req) == (108.5, Reason.STALE)


def test_deadline_wins_when_it_comes_first():
    assert request_due(running(last=105.0, deadline_at=106.0)) == (106.0, Reason.DEADLINE)
    assert request_due(running(deadline_at=104.0)) == (104.0, Reason.DEADLINE)


def test_starting_worker_has_startup_deadline_then_heartbeat_liveness():
    worker = Worker(b"p.0.0", "p", 0, 0, spawned_at=50.0)
    assert worker_due(worker, liveness=1.0, startup_timeout=30.0) == (80.0, Reason.STARTUP)
    worker.state, worker.last_beat = WorkerState.READY, 60.0
    assert worker_due(worker, liveness=1.0, startup_timeout=30.0) == (61.0, Reason.HEARTBEAT)


def test_first_retry_is_immediate_then_backoff_grows_with_jitter_and_cap():
    assert retry_delay(2, 0.1, 5.0, 0.9) == 0.0
    assert retry_delay(3, 0.1, 5.0, 0.5) == pytest.approx(0.1)
    assert retry_delay(4, 0.1, 5.0, 0.5) == pytest.approx(0.2)
    assert retry_delay(4, 0.1, 5.0, 0.0) == pytest.approx(0.1)  # -50%
    assert retry_delay(40, 0.1, 5.0, 0.5) == pytest.approx(5.0)


def test_stall_reasons():
    stalls = {Reason.HEADERS, Reason.FIRST_EVENT, Reason.STALE, Reason.HEARTBEAT}
    assert {r for r in Reason if r.is_stall} == stalls


def test_headers_timeout_counts_from_send_until_the_headers_come():
    req = running(sent=100.0)
    req.headers_timeout = 3.0
    assert request_due(req) == (103.0, Reason.HEADERS)
    req.headers_at = 101.0  # the headers came: the long wait for a first token begins
    assert request_due(req) == (110.0, Reason.FIRST_EVENT)
