"""The circuit breaker's state machine, driven with a clock of plain numbers."""

from __future__ import annotations

import random

from broker.server.circuits import Circuit, Limits, State


def circuit(failures: int = 3, cooldown: float = 5.0, cooldown_max: float = 10.0) -> Circuit:
    return Circuit(Limits(failures, cooldown, cooldown_max), rng=random.Random(1))


def test_it_opens_after_the_failures_in_a_row_and_a_success_resets_the_count():
    c = circuit()
    c.failure(0.0)
    c.failure(0.1)
    c.success(0.2)  # the count is of failures in a row
    c.failure(0.3)
    c.failure(0.4)
    assert c.state is State.CLOSED and c.available(0.5) and not c.admit(0.5)
    c.failure(0.5)
    assert c.state is State.OPEN and c.opened == 1
    assert 0.5 + 4.0 <= c.until <= 0.5 + 6.0  # 5 s ± 20%
    assert not c.available(c.until - 0.01)


def test_one_probe_after_the_cooldown_closes_it_on_success():
    c = circuit()
    for t in range(3):
        c.failure(t)
    assert c.available(c.until) and c.admit(c.until)  # the probe
    assert c.state is State.HALF_OPEN
    assert not c.available(c.until + 0.1)  # only one probe at a time
    c.success(c.until + 0.2)
    assert c.state is State.CLOSED and c.available(c.until + 0.3) and not c.admit(c.until + 0.3)
    assert c.transitions == ["open", "half_open", "closed"] and c.probes == 1


def test_a_failed_probe_doubles_the_cooldown_up_to_the_cap():
    c = circuit(cooldown=1.0, cooldown_max=3.0)
    for t in range(3):
        c.failure(t)
    lengths = []
    for _ in range(4):
        start = c.until
        assert c.available(start) and c.admit(start)
        c.failure(start)
        lengths.append(c.until - start)
    assert 1.6 <= lengths[0] <= 2.4 and all(2.4 <= n <= 3.6 for n in lengths[1:])  # 2, then capped at 3 (±20%)
    assert c.state is State.OPEN
    assert c.admit(c.until)
    c.success(c.until)
    for t in range(3):
        c.failure(100.0 + t)
    assert c.until - 102.0 <= 1.2  # closing put the cooldown back to its base


def test_a_probe_ended_for_our_own_reasons_frees_the_slot():
    c = circuit()
    for t in range(3):
        c.failure(t)
    assert c.admit(c.until)
    c.abandoned()  # cancelled by its caller, a crashed worker: nothing learnt about the provider
    assert c.state is State.HALF_OPEN and c.available(c.until) and c.admit(c.until)


def test_a_429_naming_its_wait_opens_it_for_that_long_at_once():
    c = circuit()
    c.failure(10.0, retry_after=4.0)
    assert c.state is State.OPEN and c.until == 14.0
    c.failure(11.0, retry_after=60.0)  # capped; re-opening never shortens the wait
    assert c.until == 21.0
    d = circuit()
    d.failure(10.0, retry_after=0.2)  # a short wait is an ordinary failure
    assert d.state is State.CLOSED and d.failures == 1


def test_a_straggler_success_while_open_changes_nothing():
    c = circuit()
    for t in range(3):
        c.failure(t)
    until = c.until
    c.success(3.0)
    assert c.state is State.OPEN and c.until == until and c.opens_at(3.0) == until
    assert c.opens_at(until + 1) == until + 1


def test_zero_failures_turns_it_off():
    c = circuit(failures=0)
    for t in range(10):
        c.failure(t, retry_after=5.0)
    assert c.state is State.CLOSED and c.available(10.0) and not c.admit(10.0)


def test_when_every_deployment_is_open_the_one_tried_anyway_is_the_probe():
    c = circuit()
    for t in range(3):
        c.failure(t)
    assert not c.available(2.5)
    assert c.admit(2.5) and c.state is State.HALF_OPEN  # "panic": sent before its cooldown ended
    c.failure(2.6)
    assert c.state is State.OPEN and c.opened == 2  # a failed probe opens it again
