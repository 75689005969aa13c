"""Configuration: precedence file < environment < keywords, clear errors, limit resolution."""

from __future__ import annotations

import pytest

from broker.config import ConfigError, Limits, load_settings


def test_defaults_are_generous_but_under_the_field_stall():
    s = load_settings(env={})
    assert s.stale_timeout == 30.0 and s.first_event_timeout == 300.0
    assert set(s.profiles) == {"anthropic", "openai"}
    assert s.profiles["anthropic"].base_url is None  # left to the SDK: ANTHROPIC_BASE_URL works


def test_precedence_file_then_env_then_keywords(tmp_path):
    path = tmp_path / "isopool.toml"
    path.write_text("stale_timeout = 11\ndeadline = 99\nqueue_limit = 5\n")
    env = {"ISOPOOL_STALE_TIMEOUT": "12", "ISOPOOL_DEADLINE": "98"}
    s = load_settings(path, env=env, deadline=97)
    assert (s.queue_limit, s.stale_timeout, s.deadline) == (5, 12.0, 97.0)


def test_config_file_from_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[profiles.local]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n')
    s = load_settings(env={"ISOPOOL_CONFIG": str(path)})
    assert list(s.profiles) == ["local"] and s.default_profile("openai") == "local"


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"stale_timeout": 0}, "stale_timeout"),
        ({"stale_timeout": "soon"}, "stale_timeout"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"no_such_setting": 1}, "no_such_setting"),
        ({"profiles": {"x": {"kind": "gemini"}}}, "kind"),
        ({"profiles": {"x": {"kind": "openai", "min_workers": 3, "max_workers": 2}}}, "min_workers"),
        ({"profiles": {"x": {"kind": "openai", "sdk_max_retries": 2}}}, "sdk_max_retries is gone.*max_attempts"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(env={}, **kwargs)


def test_bad_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("stale_timeout = = 3")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_settings(path, env={})


def test_limits_resolve_request_then_model_then_profile_then_global():
    s = load_settings(
        env={},
        stale_timeout=30,
        models={"o*": {"first_event_timeout": 900}},
        profiles={
            "openai": {
                "kind": "openai",
                "stale_timeout": 20,
                "models": {"o3*": {"stale_timeout": 120}, "o3-pro*": {"stale_timeout": 600}},
            }
        },
    )
    assert s.limits("openai", "gpt-5", Limits()) == (300.0, 20.0, 1800.0)
    assert s.limits("openai", "o3-mini", Limits()) == (900.0, 120.0, 1800.0)
    assert s.limits("openai", "o3-pro-high", Limits()) == (900.0, 600.0, 1800.0)  # most specific glob
    assert s.limits("openai", "o3-pro", Limits(stale_timeout=5)) == (900.0, 5.0, 1800.0)


def test_socket_directory_is_private_and_one_others_can_write_is_refused(tmp_path):
    import os
    import stat

    import zmq

    from broker.endpoints import ensure_private_dir, ipc_url, restrict

    private = ensure_private_dir(str(tmp_path / "run"))
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    url = ipc_url(private, "frontend")
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.bind(url)
        restrict(url)
        assert stat.S_IMODE(os.stat(url[6:]).st_mode) == 0o600
        sock.setsockopt(zmq.LINGER, 0)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        ensure_private_dir(str(shared))
