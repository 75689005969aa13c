"""Where a request goes: which deployment runs its next attempt (`Router.pick`), and what follows a
failed one (`Router.next`): the same target again, another target of its chain, or the end.

Pure decisions over the broker's records; the flow carries them out. One budget for all of it: every
upstream request is an attempt of the call's `max_attempts`, under its one deadline, whichever
deployment or fallback it went to (retrypolicy.py says how long to wait before each).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from ..config import Settings
from ..routes import groups


class Router:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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

    def _weighted(self, eligible: list[str]) -> str:
        """Smooth weighted round-robin (nginx's): deterministic, and spreads each group's turns evenly."""
        for key in eligible:
            self.current[key] += self.weights[key]
        chosen = max(eligible, key=lambda k: self.current[k])
        self.current[chosen] -= sum(self.weights[k] for k in eligible)
        return chosen
