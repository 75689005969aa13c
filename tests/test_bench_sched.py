"""bench.sched cuts a call into stretches by the wake-ups perf's scheduler record shows. Read here from a
record written out by hand in `perf sched timehist -w`'s format: the chain of one call is found in order
among other wake-ups, a call whose chain breaks off is skipped, and each stretch is the time between the
wake-ups that bound it."""

from __future__ import annotations

import statistics

import pytest

from bench.sched import BARE_CHAIN, STRETCHES, calls, slowest, stretches, wakeups

ROLES = {10: "caller", 11: "callerIO", 20: "broker", 21: "brokerIO", 30: "worker", 31: "workerIO", 40: "upstream"}
NAMES = {"caller": "python[10]", "callerIO": "ZMQbg/IO/0[11/10]", "broker": "python[20]",
         "brokerIO": "ZMQbg/IO/0[21/20]", "worker": "python[30]", "workerIO": "ZMQbg/IO/0[31/30]",
         "upstream": "python[40]"}  # fmt: skip


def _line(at: float, step: str) -> str:
    waker, woken = step.split(">")
    return f"   {at:.6f} [0001]  {NAMES[waker]:30}                          awakened: {NAMES[woken]}"


def _record(start: float, gap: float) -> list[str]:
    return [_line(start + i * gap, step) for i, step in enumerate(BARE_CHAIN)]


def test_each_whole_chain_is_a_call_and_each_stretch_its_share():
    lines = ["           time    cpu  task name   wait time  sch delay   run time",
             "   1.000000 [0000]  python[10]         0.010      0.000      0.500",
             "   1.000500 [0000]  kworker/0:1[99]   awakened: python[10]",
             *_record(2.0, 10e-6),
             _line(2.5, "caller>callerIO"), _line(2.50001, "callerIO>brokerIO"),  # a call that breaks off: skipped
             *_record(3.0, 20e-6)]  # fmt: skip
    found = calls(wakeups(lines, ROLES), BARE_CHAIN)
    assert len(found) == 2
    assert found[0][0] == pytest.approx(2.0) and found[1][0] == pytest.approx(3.0)
    medians = stretches(found)
    for n, (name, start, end) in enumerate(STRETCHES):  # 15 µs per wake-up step: (10 + 20) / 2
        steps = (len(BARE_CHAIN) - 1 if end == -1 else end) - start
        assert medians[f"{n + 1}. {name}"] == pytest.approx(15 * steps)
    assert medians["total: request sent -> answer in the calling thread"] == pytest.approx(15 * (len(BARE_CHAIN) - 1))


def test_wakeups_of_threads_outside_the_roles_are_left_out():
    lines = ["   5.000000 [0001]  python[10]                 awakened: sshd[77]",
             "   5.000010 [0001]  python[10]                 awakened: ZMQbg/IO/0[11/10]"]  # fmt: skip
    assert wakeups(lines, ROLES) == [(5.00001, "caller>callerIO")]


def test_the_tail_is_the_slowest_calls_and_their_mean_stretches():
    """Of 200 calls, the two slowest (1%) are the tail; each stretch's figure is their mean."""
    lines = [line for n in range(200) for line in _record(10.0 + n, (30e-6 if n in (7, 150) else 10e-6) + n * 1e-9)]
    found = calls(wakeups(lines, ROLES), BARE_CHAIN)
    tail = slowest(found)
    assert [round(c[0]) for c in tail] == [17, 160]
    first = stretches(tail, statistics.fmean)[f"1. {STRETCHES[0][0]}"]
    assert first == pytest.approx(60, abs=0.1)  # two steps of 30 µs
