"""Deployments and fallback chains: the operator's routing settings, checked and resolved.

A profile's deployments (keys, base URLs) each get a worker group of their own, named
`profile.deployment` (a profile without deployments has one group, named after the profile).
A request's chain is flat: its own profile first, then the fallbacks of the most specific rule
(a model glob of its profile, the profile, a global model glob), each target once, never a
target's own fallbacks. Chains are lists of (profile, model) pairs, "" meaning the request's own.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from typing import TYPE_CHECKING

import msgspec

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Deployment, Profile, Settings, Target

log = logging.getLogger(__name__)

Hop = tuple[str, str]  # (profile, model); model "" keeps the request's own
FALLBACK_ON = ("retryable", "silence", "stall", "open", "content_filter")  # or "status:NNN"
_NAME = re.compile(r"[a-z0-9_-]+\Z")  # a deployment's name goes into worker idents and metric labels


def group_key(profile: str, deployment: str) -> str:
    return f"{profile}.{deployment}" if deployment else profile


def groups(settings: Settings) -> dict[str, tuple[str, str, Profile]]:
    """Every worker group: its key -> (profile name, deployment name, the profile its workers run)."""
    found = {}
    for name, profile in settings.profiles.items():
        for dep in profile.deployments or [None]:
            merged = profile if dep is None else merge(profile, dep)
            found[group_key(name, dep.name if dep else "")] = (name, dep.name if dep else "", merged)
    return found


def merge(profile: Profile, dep: Deployment) -> Profile:
    """The profile a deployment's workers run: its own settings over the profile's."""
    fields = {f: v for f in ("base_url", "api_key_env", "min_workers", "max_workers", "spare_workers")
              if (v := getattr(dep, f)) is not None}  # fmt: skip
    headers = {**profile.default_headers, **dep.default_headers}
    return msgspec.structs.replace(profile, **fields, default_headers=headers, deployments=[])


def chain(settings: Settings, profile: str, model: str) -> list[Hop]:
    """The request's targets in order, its own first: (profile, model), each once."""
    # a model rule's `fallbacks = []` says "none for these models"; the profile's default [] says nothing
    lists = [
        r.fallbacks if r is not settings.profiles[profile] else r.fallbacks or None
        for r in _rules(settings, profile, model)
    ]
    fallbacks = next((f for f in lists if f is not None), [])
    kind = settings.profiles[profile].kind
    hops = [(profile, "")]
    for target in fallbacks:
        hop = resolve(target, profile)
        # a global model rule may name profiles of either API: only this request's applies
        if hop not in hops and hop != (profile, model) and settings.profiles[hop[0]].kind == kind:
            hops.append(hop)
    return hops


def context_hop(settings: Settings, profile: str, model: str) -> Hop | None:
    """Where a context-length failure of this model goes (a named larger-context model), if anywhere."""
    target = next((r.context_fallback for r in _rules(settings, profile, model) if r.context_fallback), None)
    return None if target is None else resolve(target, profile)


def _rules(settings: Settings, profile: str, model: str) -> list:
    """Rules that may name fallbacks for this request, most specific first."""
    p = settings.profiles[profile]
    return [*matching(p.models, model), p, *matching(settings.models, model)]


def matching(rules: dict, model: str) -> list:
    """Rules whose glob matches the model, most specific (longest pattern) first."""
    return [rules[p] for p in sorted(rules, key=len, reverse=True) if fnmatch.fnmatchcase(model, p)]


def resolve(target: Target, profile: str) -> Hop:
    return target.profile or profile, target.model


def own_chain(settings: Settings, profile: str, fallbacks: list[Hop]) -> list[Hop]:
    """A request's chain from the fallbacks it names itself (they replace the configured ones; the
    context fallback stays); ValueError naming `request_fallbacks` for one the pool does not allow."""
    hops = [(profile, "")]
    for hop in fallbacks:
        if not hop[0] and hop[1] in settings.profiles:  # a bare name: a profile if there is one by that name
            hop = (hop[1], "")
        hop = (hop[0] or profile, hop[1])
        other = settings.profiles.get(hop[0])
        if other is None or not allowed(settings, hop):
            named = "/".join(filter(None, hop))
            raise ValueError(f"fallback {named!r} is not allowed by this pool (setting request_fallbacks lists "
                             "the profiles and models a request may name)")  # fmt: skip
        if other.kind != settings.profiles[profile].kind:
            raise ValueError(f"fallback profile {hop[0]!r} is of kind {other.kind}: requests are relayed, never "
                             "translated to another API")  # fmt: skip
        if hop not in hops:
            hops.append(hop)
    return hops


def allowed(settings: Settings, hop: Hop) -> bool:
    """Whether a request may name this fallback itself: a `request_fallbacks` entry of its profile
    whose model (a glob; "" any) matches."""
    profile, model = hop
    return any(
        t.profile == profile and (not t.model or fnmatch.fnmatchcase(model, t.model))
        for t in settings.request_fallbacks
    )


def check_routes(settings: Settings) -> None:
    """Each error names the setting: deployments, fallbacks, context_fallback, fallback_on, request_fallbacks."""
    profiles = settings.profiles
    for name, p in profiles.items():
        seen = set()
        for dep in p.deployments:
            where = f"profile {name}: deployment {dep.name!r}"
            if not _NAME.match(dep.name) or dep.name in seen:
                raise ConfigError(f"{where}: deployments need unique names of a-z, 0-9, _ and - (setting deployments)")
            seen.add(dep.name)
            if not dep.weight > 0:
                raise ConfigError(f"{where}: weight must be > 0, got {dep.weight}")
            m = merge(p, dep)
            if not (0 <= m.min_workers <= m.max_workers) or m.max_workers < 1 or m.spare_workers < 0:
                raise ConfigError(
                    f"{where}: need 0 <= min_workers <= max_workers, max_workers >= 1, spare_workers >= 0"
                )
        for on in p.fallback_on:
            if on not in FALLBACK_ON and not re.fullmatch(r"status:[1-5]\d\d", on):
                raise ConfigError(f"profile {name}: fallback_on {on!r} is not one of {', '.join(FALLBACK_ON)}, "
                                  "status:NNN")  # fmt: skip
        rules = [(f"profile {name}", p), *((f"profile {name}: models {g!r}", r) for g, r in p.models.items())]
        for where, rule in rules:
            _check_targets(settings, name, where, rule)
        if any(t.profile in ("", name) and not t.model for t in p.fallbacks):
            log.warning("profile %s: a fallback to itself (same profile, same model) is only a retry", name)
        if len(p.fallbacks) >= settings.max_attempts:
            log.warning("profile %s: %d fallbacks, but a call has max_attempts = %d: the last ones are never reached",
                        name, len(p.fallbacks), settings.max_attempts)  # fmt: skip
    for glob, rule in settings.models.items():
        for setting, target in _targets(rule):
            if target.profile and target.profile not in profiles:
                raise ConfigError(f"models {glob!r}: {setting} names profile {target.profile!r}, which does not "
                                  f"exist (profiles: {', '.join(profiles)})")  # fmt: skip
    for target in settings.request_fallbacks:
        if target.profile not in profiles:
            raise ConfigError(f"setting request_fallbacks: {target} must name one of the profiles "
                              f"({', '.join(profiles)})")  # fmt: skip


def _check_targets(settings: Settings, profile: str, where: str, rule: object) -> None:
    """Targets name known profiles of the same API (bytes are relayed, never translated); a context
    fallback names a model."""
    kind = settings.profiles[profile].kind
    for setting, target in _targets(rule):
        other = settings.profiles.get(target.profile or profile)
        if other is None:
            raise ConfigError(f"{where}: {setting} names profile {target.profile!r}, which does not exist "
                              f"(profiles: {', '.join(settings.profiles)})")  # fmt: skip
        if other.kind != kind:
            raise ConfigError(f"{where}: {setting} goes to profile {target.profile!r} of kind {other.kind}, not "
                              f"{kind}: requests are relayed as they are, never translated")  # fmt: skip
        if setting == "context_fallback" and not target.model:
            raise ConfigError(f"{where}: context_fallback must name a model (a larger-context one)")


def _targets(rule: object) -> list[tuple[str, Target]]:
    """A rule's (setting, target) pairs: its fallbacks, then its context fallback."""
    found = [("fallbacks", t) for t in getattr(rule, "fallbacks", None) or []]
    context = getattr(rule, "context_fallback", None)
    return found + [("context_fallback", context)] if context is not None else found
