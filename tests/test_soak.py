"""The chaos soak, short: twenty seconds of mixed load from two client processes under every
kind of chaos (`python -m tests.soak --minutes 10` is the long version)."""

from __future__ import annotations

from .soak import Soak


def test_short_chaos_soak_keeps_every_invariant():
    report = Soak(minutes=0.35, clients=2).run()
    assert report["violations"] == [], report
    assert report["requests_answered"] >= 100, report
    assert sum(report["faults_injected"].values()) >= 20, report
    assert report["chaos"].get("worker SIGKILL", 0) + report["chaos"].get("worker SIGSTOP", 0) >= 5, report
    assert report["client_outcomes"].get("ok", 0) > report["requests_answered"] / 2, report
