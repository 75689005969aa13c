"""bench.respawn waits for a killed worker's replacement without spinning: it asked the broker for its
stats in a tight loop, a core of the caller's and much of the broker's on a 2-core machine, during the very
respawn it measures. It now polls every millisecond or so, and still measures kill -> replacement seen ready."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.respawn import respawn

REPLACED_AFTER = 0.05  # seconds from the kill until the stub broker reports a ready replacement


class _Broker:
    """A client whose stats() show one ready worker (a real process, killed by the bench), then a ready
    replacement REPLACED_AFTER seconds after that process died; counts the stats() calls."""

    def __init__(self) -> None:
        self.victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.calls = 0
        self.died_at: float | None = None

    def stats(self) -> dict:
        self.calls += 1
        workers = [{"ident": "w1", "pid": self.victim.pid, "state": "ready"}]
        if self.died_at is None and self.victim.poll() is not None:
            self.died_at = time.perf_counter()
        if self.died_at is not None and time.perf_counter() - self.died_at >= REPLACED_AFTER:
            workers = [{"ident": "w2", "pid": 0, "state": "ready"}]
        return {"workers": workers}


def test_waiting_for_a_respawn_polls_at_most_about_once_a_millisecond():
    broker = _Broker()
    try:
        (took,) = respawn(broker, 1)
    finally:
        broker.victim.kill()
        broker.victim.wait()
    assert REPLACED_AFTER <= took < REPLACED_AFTER + 1.0  # still kill -> replacement seen ready
    assert broker.calls <= REPLACED_AFTER * 1000 + 20, f"{broker.calls} stats() calls in {took * 1e3:.0f} ms"
