"""The watchdog's timing rules, as pure functions of a request's or a worker's clock readings.

- headers_timeout: request sent to a worker -> the provider's response headers (a healthy provider
  sends them within seconds, even for a model that will think for minutes);
- first_event_timeout: request sent to a worker -> first real event;
- stale_timeout: between two real events (pings and keep-alives are not events);
- deadline: the whole request, from acceptance, across retries;
- heartbeat liveness: interval x allowed misses since the worker's last sign of life (then a
  short wait for its stacks, worker/stacks.py);
- startup: a worker that is not READY within startup_timeout.
"""

from __future__ import annotations

from .state import Reason, Request, Worker, WorkerState

ENDING_GRACE = 5.0  # a finished stream's worker ends it within worker/sse.py's GRACE (1 s); after this, a stall


def request_due(req: Request) -> tuple[float, Reason]:
    """When the running request breaches a limit if nothing arrives, and which limit."""
    if req.last_event_at is None and req.headers_at is None and req.headers_timeout < req.first_event_timeout:
        due, reason = req.sent_at + req.headers_timeout, Reason.HEADERS
    elif req.last_event_at is None:
        due, reason = req.sent_at + req.first_event_timeout, Reason.FIRST_EVENT
    else:  # a stream that said it finished is ended by its worker within a GRACE: this is the backstop
        due, reason = req.last_event_at + max(req.stale_timeout, ENDING_GRACE if req.ending else 0), Reason.STALE
    if req.deadline_at <= due:
        return req.deadline_at, Reason.DEADLINE
    return due, reason


def worker_due(worker: Worker, liveness: float, startup_timeout: float) -> tuple[float, Reason]:
    """When the worker is declared dead if it stays silent, and why."""
    if worker.state is WorkerState.STARTING:
        return worker.spawned_at + startup_timeout, Reason.STARTUP
    if worker.state is WorkerState.HUNG:
        return worker.kill_at, Reason.HEARTBEAT
    return worker.last_beat + liveness, Reason.HEARTBEAT


def retry_delay(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Backoff before attempt number `attempt` (2 = the first retry): immediate for the first retry,
    then exponential with +-50% jitter (`jitter` is a uniform draw in [0, 1))."""
    if attempt <= 2:
        return 0.0
    return min(cap, base * 2 ** (attempt - 3)) * (0.5 + jitter)


class Alarm:
    """When the watchdog next needs to look: lowered by whoever starts a clock (a request sent, a
    retry's backoff, a spawn), set afresh by each watchdog pass from what each concern says is due."""

    def __init__(self) -> None:
        self.at = 0.0

    def by(self, when: float) -> None:
        if when < self.at:
            self.at = when
