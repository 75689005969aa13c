"""Deployments and fallbacks in the settings: each bad one named, chains flat and resolved per model."""

from __future__ import annotations

import pytest

from broker import routes
from broker.config import ConfigError, Profile, load_settings


def settings(**extra):
    return load_settings(env={}, **extra)


def two(**primary):
    return {"profiles": {"claude": {"kind": "anthropic", **primary}, "backup": {"kind": "anthropic"},
                         "gpt": {"kind": "openai"}}}  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (two(fallbacks=[{"profile": "nope"}]), "profile claude: fallbacks names profile 'nope'"),
        (two(fallbacks=[{"profile": "gpt"}]), "fallbacks goes to profile 'gpt' of kind openai.*never translated"),
        (two(context_fallback={"profile": "backup"}), "context_fallback must name a model"),
        (two(models={"claude-opus-*": {"fallbacks": [{"profile": "x"}]}}), "models 'claude-opus-\\*': fallbacks"),
        (two(fallback_on=["retryable", "sometimes"]), "fallback_on 'sometimes'"),
        (two(fallbacks=[{"profil": "backup"}]), "profil"),
        (two(deployments=[{"name": "US"}]), "deployment 'US'.*setting deployments"),
        (two(deployments=[{"name": "us"}, {"name": "us"}]), "deployment 'us'.*unique"),
        (two(deployments=[{"name": "us", "weight": 0}]), "deployment 'us': weight"),
        (two(deployments=[{"name": "us", "min_workers": 9}]), "deployment 'us': need 0 <= min_workers"),
        (two(strategy="random"), "strategy"),
        ({"request_fallbacks": [{"profile": "nope"}]}, "setting request_fallbacks"),
        ({"models": {"gpt-*": {"fallbacks": [{"profile": "nope"}]}}}, "models 'gpt-\\*': fallbacks names profile"),
    ],
)
def test_bad_routing_settings_name_the_setting(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        settings(**kwargs)


def test_chains_are_flat_own_profile_first_each_target_once():
    s = settings(
        **two(
            fallbacks=[{"profile": "backup"}, {"model": "claude-haiku"}, {"profile": "backup"}],
            context_fallback={"model": "claude-1m"},
            models={"claude-opus-*": {"fallbacks": [{"model": "claude-sonnet"}]}},
        ),
        models={"gpt-*": {"fallbacks": [{"model": "gpt-mini"}, {"profile": "claude"}]}},
    )
    assert routes.chain(s, "claude", "claude-x") == [("claude", ""), ("backup", ""), ("claude", "claude-haiku")]
    assert routes.chain(s, "claude", "claude-opus-4") == [("claude", ""), ("claude", "claude-sonnet")]
    assert routes.chain(s, "backup", "claude-x") == [("backup", "")]  # a fallback's own fallbacks: never followed
    assert routes.chain(s, "gpt", "gpt-4") == [("gpt", ""), ("gpt", "gpt-mini")]  # not the other API's profile
    assert routes.chain(s, "claude", "claude-haiku") == [("claude", ""), ("backup", "")]  # not its own model again
    assert routes.context_hop(s, "claude", "claude-x") == ("claude", "claude-1m")
    assert routes.context_hop(s, "backup", "claude-x") is None


def test_a_profile_without_deployments_is_one_group_named_after_it():
    s = settings(**two(deployments=[{"name": "us", "weight": 3, "max_workers": 2},
                                    {"name": "eu", "base_url": "http://eu", "default_headers": {"b": "2"}}],
                       default_headers={"a": "1"}, base_url="http://us"))  # fmt: skip
    groups = routes.groups(s)
    assert list(groups) == ["claude.us", "claude.eu", "backup", "gpt"]
    _, name, us = groups["claude.us"]
    assert (name, us.base_url, us.max_workers, us.deployments) == ("us", "http://us", 2, [])
    eu = groups["claude.eu"][2]
    assert (eu.base_url, eu.default_headers, eu.max_workers) == ("http://eu", {"a": "1", "b": "2"}, 8)
    assert groups["backup"] == ("backup", "", s.profiles["backup"])


def test_request_fallbacks_allowlist_matches_profile_and_model_glob():
    s = settings(**two(), request_fallbacks=[{"profile": "backup"}, {"profile": "claude", "model": "claude-h*"}])
    assert routes.allowed(s, ("backup", "")) and routes.allowed(s, ("backup", "any"))
    assert routes.allowed(s, ("claude", "claude-haiku"))
    assert not routes.allowed(s, ("claude", "claude-opus")) and not routes.allowed(s, ("gpt", ""))


def test_profiles_given_as_objects_keep_their_routes():
    s = settings(profiles={"a": Profile(kind="openai", deployments=[{"name": "k1"}], fallbacks=[{"profile": "b"}]),
                           "b": Profile(kind="openai")})  # fmt: skip
    assert routes.chain(s, "a", "m") == [("a", ""), ("b", "")] and list(routes.groups(s)) == ["a.k1", "b"]


def test_a_model_rule_with_no_fallbacks_turns_the_profiles_off_for_its_models():
    s = settings(**two(fallbacks=[{"profile": "backup"}], models={"claude-tiny*": {"fallbacks": []}}))
    assert routes.chain(s, "claude", "claude-tiny-1") == [("claude", "")]
    assert routes.chain(s, "claude", "claude-big") == [("claude", ""), ("backup", "")]
