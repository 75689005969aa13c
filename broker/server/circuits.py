"""One circuit breaker per deployment: after a run of provider failures, stop sending it requests for
a cooldown, then let one real request through as a probe, and close again on its first real event.

    CLOSED    --`failures` in a row, or a 429 naming its wait--> OPEN (until now + cooldown)
    OPEN      --its cooldown passed, at the next `admit`-->       HALF_OPEN: one request is the probe
    HALF_OPEN --the probe's first real event-->                  CLOSED (cooldown back to its base)
    HALF_OPEN --the probe failed-->                               OPEN (cooldown doubled, up to the cap)
    HALF_OPEN --the probe ended for a reason not the provider's--> HALF_OPEN, the probe slot free again

Pure: every method takes `now` (the broker's monotonic clock), so the tests drive it with numbers.
A success arriving while OPEN (a straggler sent before it opened) changes nothing, as Envoy does not
un-eject on stragglers; re-opening keeps the later of the two deadlines (never shortens a wait).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from ..protocol import CircuitSnapshot


class State(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings a circuit reads (see the README's configuration table)."""

    failures: int = 3  # in a row; 0 turns circuit breaking off
    cooldown: float = 5.0  # the first time open; ±20% jitter so that deployments do not probe in step
    cooldown_max: float = 10.0  # each failed probe doubles the cooldown up to this


_RNG = random.Random()  # one for all: a generator's state (2.5 KiB) each would be most of a circuit's memory


@dataclass(slots=True)
class Circuit:
    limits: Limits
    rng: random.Random = field(default_factory=lambda: _RNG)
    state: State = State.CLOSED
    failures: int = 0  # in a row, while CLOSED
    until: float = 0.0  # while OPEN: when a probe may go
    cooldown: float = 0.0  # the next opening's length, before jitter
    probing: bool = False  # HALF_OPEN: the probe is out
    probes: int = 0
    opened: int = 0
    transitions: list[str] = field(default_factory=list)  # the last few, oldest first: tests and stats read the order

    def __post_init__(self) -> None:
        self.cooldown = self.limits.cooldown

    @property
    def enabled(self) -> bool:
        return self.limits.failures > 0

    def available(self, now: float) -> bool:
        """Whether a request may be sent now: closed, or open with its cooldown over and no probe out."""
        if not self.enabled or self.state is State.CLOSED:
            return True
        return not self.probing and (self.state is State.HALF_OPEN or now >= self.until)

    def admit(self, now: float) -> bool:
        """A request is sent now (`available` said yes, or every deployment was open: the one opening
        soonest is tried anyway); True if it is the probe, whose outcome the caller must then report
        (`success`, `failure` or `abandoned`)."""
        if not self.enabled or self.state is State.CLOSED:
            return False
        if self.state is State.OPEN:
            self._to(State.HALF_OPEN)
        self.probing, self.probes = True, self.probes + 1
        return True

    def success(self, now: float) -> None:
        """The provider answered: a first real event, or an error that was the request's own fault (a 4xx)."""
        if self.state is State.OPEN:
            return
        if self.state is State.HALF_OPEN:
            self.probing, self.cooldown = False, self.limits.cooldown
            self._to(State.CLOSED)
        self.failures = 0

    def failure(self, now: float, retry_after: float | None = None) -> None:
        """The provider failed (429, 5xx, a dropped connection, silence, a stall, a cut stream). A 429
        that names its wait opens the circuit for that long at once (capped): the provider said when."""
        if not self.enabled:
            return
        if retry_after is not None and retry_after >= 1.0:
            self._open(now, min(retry_after, self.limits.cooldown_max))
        elif self.state is State.HALF_OPEN:
            self.cooldown = min(2 * self.cooldown, self.limits.cooldown_max)
            self._open(now, self._jittered(self.cooldown))
        elif self.state is State.CLOSED:
            self.failures += 1
            if self.failures >= self.limits.failures:
                self._open(now, self._jittered(self.cooldown))

    def abandoned(self) -> None:
        """The probe ended for a reason that says nothing of the provider (cancelled, a crash, a neighbour)."""
        if self.state is State.HALF_OPEN:
            self.probing = False

    def opens_at(self, now: float) -> float:
        """When a request could next go (now if it may): to pick the least-bad deployment when all are open."""
        return self.until if self.state is State.OPEN and now < self.until else now

    def snapshot(self, now: float) -> CircuitSnapshot:
        return CircuitSnapshot(
            state=self.state.name.lower(),
            failures=self.failures,
            until_in=round(max(0.0, self.until - now), 3) if self.state is State.OPEN else 0.0,
            probes=self.probes,
            opened=self.opened,
            transitions=list(self.transitions),
        )

    def _open(self, now: float, seconds: float) -> None:
        self.probing, self.failures = False, 0
        self.until = max(self.until, now + seconds)
        if self.state is not State.OPEN:
            self.opened += 1
            self._to(State.OPEN)

    def _jittered(self, seconds: float) -> float:
        return seconds * self.rng.uniform(0.8, 1.2)

    def _to(self, state: State) -> None:
        self.state = state
        self.transitions = [*self.transitions[-15:], state.name.lower()]
