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


def request(s, profile: str, model: str = "m", attempt: int = 1, group: str = ""):
    from broker.protocol import Submit
    from broker.server.state import Request

    req = Request(1, b"c", 1, Submit(1, profile, model), b"", profile, 20.0, 20.0, 100.0, 0.0, attempt=attempt)
    req.hops, req.context = routes.chain(s, profile, model), routes.context_hop(s, profile, model)
    req.used, req.group, req.target_attempts = req.hops[:1], group or profile, attempt
    return req


def test_a_chain_as_long_as_the_budget_gives_each_target_one_attempt():
    from broker.server.routing import End, Move, Router
    from broker.server.state import Reason

    s = settings(**two(fallbacks=[{"profile": "backup"}, {"model": "claude-haiku"}]))
    router, req = Router(s), request(s, "claude")
    seen = []
    while not isinstance(decision := router.next(req, Reason.HTTP_5XX, "", [], None, 0.0, 0.5), End):
        assert isinstance(decision, Move)
        seen.append(decision.hop)
        req.used.append(decision.hop)
        req.profile, req.group, req.attempt, req.target_attempts = decision.hop[0], decision.hop[0], req.attempt + 1, 1
    assert seen == [("backup", ""), ("claude", "claude-haiku")] and req.attempt == 3


def test_refusals_move_only_where_configured_and_output_ends_the_call():
    from broker.protocol import Code
    from broker.server.routing import End, Move, Router, Same
    from broker.server.state import Reason

    s = settings(**two(fallbacks=[{"profile": "backup"}], fallback_on=["retryable", "status:403"],
                       context_fallback={"model": "claude-1m"}))  # fmt: skip
    router = Router(s)
    assert router.next(request(s, "claude"), None, "context_length", [], None, 0, 0) == Move(
        ("claude", "claude-1m"), "context-fallback")  # fmt: skip
    assert router.next(request(s, "claude"), None, "status:403", [], None, 0, 0) == Move(("backup", ""), "fallback")
    refused = router.next(request(s, "claude"), None, "content_filter", [], None, 0, 0)
    assert isinstance(refused, End) and not refused.first and refused.code is None  # the provider's own 400
    silent = router.next(request(s, "claude"), Reason.HEADERS, "", [], None, 0, 0)
    assert isinstance(silent, Same)  # "silence" is not in this profile's fallback_on: retried once in place
    seen = request(s, "claude")
    seen.delivered = 3
    assert router.next(seen, Reason.STALE, "", [], None, 0, 0).code == Code.STALLED


def test_another_deployment_is_tried_at_once_before_a_fallback():
    from broker.server.routing import Move, Router, Same
    from broker.server.state import Reason

    s = settings(**two(fallbacks=[{"profile": "backup"}], deployments=[{"name": "k1"}, {"name": "k2"}]))
    router, req = Router(s), request(s, "claude", group="claude.k1")
    assert router.next(req, Reason.HTTP_429, "", [], 30.0, 0, 0) == Same(0.0)  # key k2 was not rate limited
    req.group, req.attempt, req.target_attempts = "claude.k2", 2, 2
    assert router.next(req, Reason.HTTP_429, "", [], 30.0, 0, 0) == Move(("backup", ""), "fallback")


def test_a_fallback_to_itself_is_named_a_retry_at_load(caplog):
    own = {"kind": "openai", "fallbacks": [{"profile": "openai"}, {"profile": "openai", "model": "gpt-big"}]}
    with caplog.at_level("WARNING", logger="broker.routes"):
        load_settings(None, profiles={"openai": own})
    assert [r.getMessage() for r in caplog.records] == [
        "profile openai: a fallback to itself (same profile, same model) is only a retry"
    ]
