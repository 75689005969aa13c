"""Where a request goes: which deployment runs its next attempt (`Router.pick`), and what follows a
failed one (`Router.next`): the same target again, another target of its chain, or the end.

Decisions over the broker's records (`next` notes the deployment a provider failed on, nothing
else); the flow carries them out. One budget for all of it: every upstream request is an attempt of
the call's `max_attempts`, under its one deadline, whichever deployment or fallback it went to
(retrypolicy.py says how long to wait before each).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..config import Settings
from ..protocol import CircuitSnapshot, Code
from ..routes import Hop, groups
from .circuits import Circuit, State
from .circuits import Limits as CircuitLimits
from .retrypolicy import SILENT, Policy
from .state import Reason, Request


@dataclass(frozen=True, slots=True)
class Same:
    """Run the call again on its current target (another deployment of it, if one has not failed) after `delay`."""

    delay: float


@dataclass(frozen=True, slots=True)
class Move:
    """Run the call next on another target of its chain: `rescue` is `fallback` or `context-fallback`."""

    hop: Hop
    rescue: str


@dataclass(frozen=True, slots=True)
class End:
    """End the call: with `code` (the pool's error) if set, else with a provider's error: the first one
    its own target answered, if it moved on since (`first`: the real cause), or the one just answered."""

    why: str
    first: bool = True
    code: Code | None = None


Decision = Same | Move | End

_MAX_CIRCUITS = 10_000

# What a failure before output says about the target, for `fallback_on`; the rest (a crash, a
# neighbour's stall, a memory limit) is the pool's own and is simply retried.
_TRIGGERS = {
    Reason.HTTP_429: "retryable",
    Reason.HTTP_5XX: "retryable",
    Reason.HTTP_RETRYABLE: "retryable",
    Reason.CONNECTION: "retryable",
    Reason.INCOMPLETE: "retryable",
    Reason.ERROR_EVENT: "retryable",
    Reason.HEADERS: "silence",
    Reason.FIRST_EVENT: "silence",
    Reason.STALE: "stall",
}


class Router:
    """The deployments of each profile (worker groups, routes.py) and the decisions over them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = Policy(
            settings.max_attempts, settings.retry_backoff, settings.http_retry_backoff, settings.retry_after_max
        )
        self.groups = groups(settings)
        self.of_profile: dict[str, list[str]] = {name: [] for name in settings.profiles}
        self.weights: dict[str, float] = {}
        for key, (name, deployment, _) in self.groups.items():
            self.of_profile[name].append(key)
            deps = settings.profiles[name].deployments
            self.weights[key] = next((d.weight for d in deps if d.name == deployment), 1.0)
        self.current: Counter[str] = Counter()  # smooth weighted round-robin's running scores
        self.circuit_limits = CircuitLimits(
            settings.circuit_failures, settings.circuit_cooldown, settings.circuit_cooldown_max
        )
        # One per (deployment, model) that has failed: an overloaded or rate-limited model says little
        # of the key's other models. A pair that never failed has none.
        self.circuits: dict[tuple[str, str], Circuit] = {}

    def pick(
        self,
        profile: str,
        free: list[str],
        load: Callable[[str], float],
        now: float,
        model: str,
        avoid: frozenset[str] = frozenset(),
    ) -> str | None:
        """The group (deployment) of `profile` to run an attempt on, among those with a `free` worker
        and a circuit that lets it through, preferring those the call has not failed on (`avoid`): a
        429 on one key says nothing of another. None: every free one's circuit is open (`detour`)."""
        ready = [g for g in free if self.available(g, model, now)]
        eligible = [g for g in ready if g not in avoid] or ready
        if len(eligible) <= 1:
            return eligible[0] if eligible else None
        strategy = self.settings.profiles[profile].strategy
        if strategy == "ordered":  # the first in list order: a primary key, then overflow keys
            return eligible[0]
        if strategy == "weighted":
            return self._weighted(eligible)
        return min(eligible, key=load)  # least-busy; ties go to the first in list order

    def detour(self, req: Request, free: list[str], now: float) -> Move | str | None:
        """Where a request goes when `pick` found no deployment: None to wait (one whose circuit lets
        it through is busy), the next target of its chain when all of this one's are open (no attempt
        spent: nothing was sent), else the free one that opens soonest ("panic": a pool never fails a
        call only because every breaker is open)."""
        model = model_of(req)
        if any(self.available(g, model, now) for g in self.of_profile[req.profile]):
            return None
        ahead = [hop for hop in req.hops if hop not in req.used]
        if "open" in self.settings.profiles[req.hops[0][0]].fallback_on and ahead:
            return Move(ahead[0], "fallback")
        return min(free, key=lambda g: self.circuits[g, model].opens_at(now))

    def next(
        self, req: Request, reason: Reason | None, failure: str, before: Iterable[str], after: float | None,
        now: float, jitter: float,
    ) -> Decision:  # fmt: skip
        """What follows a failed attempt: `reason` is why it failed (None: the provider refused the
        request itself, a 4xx whose `failure` is `context_length`, `content_filter` or `status:NNN`);
        `before`, the reasons of the attempts before it; `after`, the provider's Retry-After.

        Rules, in order: after output the call ends (a stream opted in to be continued is the flow's,
        which asks resumes.py before it asks here);
        a refusal moves only to a context fallback, or where `fallback_on` lists it; a provider's
        failure tries another deployment of the same target at once, then the next target when this
        one fails persistently (twice; silent once; or when the budget left is what the targets after
        it need, one attempt each; or when its circuits are all open), else the retry policy's delay.
        The budget is the call's: every attempt on every target counts."""
        if req.delivered:
            code = Code.STALLED if reason is not None and reason.is_stall else Code.WORKER_LOST
            return End(f"{reason} after {req.delivered} event(s) were delivered; not retried", code=code)
        budget = req.submit.max_attempts or self.settings.max_attempts
        left = budget - req.attempt
        on = self.settings.profiles[req.hops[0][0]].fallback_on  # the call's own profile says
        ahead = [hop for hop in req.hops if hop not in req.used]
        if reason is None:  # never again on the same model
            if failure == "context_length" and req.context is not None and req.context not in req.used and left > 0:
                return Move(req.context, "context-fallback")
            if failure in on and ahead and left > 0:
                return Move(ahead[0], "fallback")
            # refused by a fallback: the caller gets its own target's first error (the cause), not the fallback's
            return End(f"the provider refused it ({failure}); not rerouted", first=len(req.used) > 1)
        trigger = _TRIGGERS.get(reason)
        if trigger is not None:
            req.failed_on.add(req.group)
        if left <= 0:
            return End(f"max_attempts ({budget}) reached")
        groups, model = self.of_profile[req.profile], model_of(req)
        moving = trigger in on and bool(ahead)
        silent_again = trigger == "silence" and any(r in SILENT for r in before)  # waited for once already
        if moving and (silent_again or left <= len(ahead)):
            return Move(ahead[0], "fallback")  # before another key: the rest of the budget is the fallbacks'
        other_key = any(g not in req.failed_on and self.available(g, model, now) for g in groups)
        if trigger is not None and not silent_again and other_key:
            return Same(0.0)  # another deployment (key) of the same target, at once
        if moving and (trigger == "silence" or req.target_attempts >= 2):
            return Move(ahead[0], "fallback")
        if "open" in on and ahead and not any(self.available(g, model, now) for g in groups):
            return Move(ahead[0], "fallback")  # its circuits just opened
        delay, why = self.policy.next_delay(reason, req.attempt, before, req.deadline_at - now, after, jitter, budget)
        if delay is None and moving:
            return Move(ahead[0], "fallback")
        return End(why) if delay is None else Same(delay)

    # ----- circuits: each attempt's outcome, as its deployment's breaker sees it -----------

    def available(self, group: str, model: str, now: float) -> bool:
        circuit = self.circuits.get((group, model))
        return circuit is None or circuit.available(now)

    def sent(self, req: Request, now: float) -> None:
        circuit = self.circuits.get((req.group, model_of(req)))
        req.probing = circuit is not None and circuit.admit(now)

    def answered(self, req: Request, now: float) -> None:
        """Its first real event, its result, or a refusal of the request itself (a 4xx): the provider works."""
        circuit = self.circuits.get((req.group, model_of(req)))
        if circuit is not None:
            circuit.success(now)
        req.probing = False

    def failed(self, req: Request, reason: Reason, after: float | None, now: float) -> None:
        """An attempt failed: the provider's failure counts on its circuit; the pool's own (a crash, a
        neighbour's stall, a memory limit, a deadline) or a limit the caller set tighter than the pool's
        says nothing of the provider (one caller's haste must not open a circuit every caller shares)."""
        if reason in _TRIGGERS and reason not in req.own_limits and req.group and self.circuit_limits.failures:
            key = (req.group, model_of(req))
            if key not in self.circuits and len(self.circuits) >= _MAX_CIRCUITS:
                self._forget()
            self.circuits.setdefault(key, Circuit(self.circuit_limits)).failure(now, after)
        else:
            self.dropped(req)
        req.probing = False

    def dropped(self, req: Request) -> None:
        """The call ended (cancelled, shut down) with an attempt out: a probe's slot is freed."""
        if req.probing and (circuit := self.circuits.get((req.group, model_of(req)))) is not None:
            circuit.abandoned()
        req.probing = False

    def circuit_snapshots(self, now: float) -> dict[str, CircuitSnapshot]:
        """By `group/model` (group: `profile` or `profile.deployment`)."""
        return {f"{group}/{model}": c.snapshot(now) for (group, model), c in self.circuits.items()}

    def _forget(self) -> None:
        """Bound the memory a stream of distinct failing models could take: closed circuits go first,
        then the oldest open ones, down to half the cap (a forgotten model's next failures open it again)."""
        for key in [k for k, c in self.circuits.items() if c.state is State.CLOSED]:
            del self.circuits[key]
        for key in list(self.circuits)[: max(0, len(self.circuits) - _MAX_CIRCUITS // 2)]:
            del self.circuits[key]

    def served(self, req: Request) -> tuple[int, str, str, str, str]:
        """Who answered (a `Served` header's fields): attempts, profile, deployment, model, rescue."""
        deployment = self.groups[req.group][1] if req.group else ""
        return req.attempt, req.profile, deployment, req.model or req.submit.model, rescue(req)

    def _weighted(self, eligible: list[str]) -> str:
        """Smooth weighted round-robin (nginx's): deterministic, and spreads each group's turns evenly."""
        for key in eligible:
            self.current[key] += self.weights[key]
        chosen = max(eligible, key=lambda k: self.current[k])
        self.current[chosen] -= sum(self.weights[k] for k in eligible)
        return chosen


def rescue(req: Request) -> str:
    """How a call came to be answered where it is: "" at its first attempt, else `fallback` or
    `context-fallback` (another target), `deployment` (another key of its own), `retry`, or, for a
    stream continued after it broke, `prefill` or `replay`."""
    if req.rescue is not None and req.rescue.strategy:  # a broken stream continued (resumes.py)
        return req.rescue.strategy
    if req.rerouted or req.attempt <= 1:
        return req.rerouted
    return "deployment" if req.failed_on and req.group not in req.failed_on else "retry"


def model_of(req: Request) -> str:
    """The model the call's current attempt asks for."""
    return req.model or req.submit.model


def target(req: Request) -> str:
    """Where the call goes now, for logs and counters: `profile` or `profile/model`."""
    return "/".join(filter(None, (req.profile, req.model)))
