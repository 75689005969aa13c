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
from ..protocol import Code
from ..routes import Hop, groups
from .retrypolicy import Policy
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

# What a failure before output says about the target, for `fallback_on`; the rest (a crash, a
# neighbour's stall, a memory limit) is the pool's own and is simply retried.
_TRIGGERS = {
    Reason.HTTP_429: "retryable",
    Reason.HTTP_5XX: "retryable",
    Reason.CONNECTION: "retryable",
    Reason.INCOMPLETE: "retryable",
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

    def pick(
        self, profile: str, free: list[str], load: Callable[[str], float], avoid: frozenset[str] = frozenset()
    ) -> str:
        """The group (deployment) of `profile` to run an attempt on, among those with a `free` worker,
        preferring those the call has not failed on (`avoid`): a 429 on one key says nothing of another.
        (A circuit breaker's check belongs here: an open deployment is not eligible.)"""
        eligible = [g for g in free if g not in avoid] or free
        if len(eligible) == 1:
            return eligible[0]
        strategy = self.settings.profiles[profile].strategy
        if strategy == "ordered":  # the first in list order: a primary key, then overflow keys
            return eligible[0]
        if strategy == "weighted":
            return self._weighted(eligible)
        return min(eligible, key=load)  # least-busy; ties go to the first in list order

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
        it need, one attempt each), else the retry policy's delay. (An open circuit, when there are
        circuits, is a Move without an attempt.) The budget is the call's: every attempt on every
        target counts."""
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
            return End(f"the provider refused it ({failure}); not rerouted", first=False)
        trigger = _TRIGGERS.get(reason)
        if trigger is not None:
            req.failed_on.add(req.group)
        if left <= 0:
            return End(f"max_attempts ({budget}) reached")
        if trigger is not None and any(g not in req.failed_on for g in self.of_profile[req.profile]):
            return Same(0.0)  # another deployment (key) of the same target, at once
        moving = trigger in on and bool(ahead)
        if moving and (trigger == "silence" or req.target_attempts >= 2 or left <= len(ahead)):
            return Move(ahead[0], "fallback")
        delay, why = self.policy.next_delay(reason, req.attempt, before, req.deadline_at - now, after, jitter, budget)
        if delay is None and moving:
            return Move(ahead[0], "fallback")
        return End(why) if delay is None else Same(delay)

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


def target(req: Request) -> str:
    """Where the call goes now, for logs and counters: `profile` or `profile/model`."""
    return "/".join(filter(None, (req.profile, req.model)))
