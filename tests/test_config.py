"""Configuration: precedence file < environment < keywords, clear errors, limit resolution."""

from __future__ import annotations

import msgspec.inspect as mi
import pytest

from broker.config import RANGES, ConfigError, Deployment, Limits, ModelRule, Profile, Settings, load_settings


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


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("source", ["file", "env", "keyword"])
def test_nan_and_inf_are_refused_from_every_source(tmp_path, source, value):
    """NaN passes `<= 0`, and turned stall detection off; inf crashed the broker (JSON has neither)."""
    path = tmp_path / "c.toml"
    path.write_text(f"stale_timeout = {value}\n" if source == "file" else "")
    env = {"ISOPOOL_STALE_TIMEOUT": value} if source == "env" else {}
    kwargs = {"stale_timeout": float(value)} if source == "keyword" else {}
    with pytest.raises(ConfigError, match=rf"setting stale_timeout must be .*finite.*, got {value}"):
        load_settings(path, env=env, **kwargs)


def _profile(**extra):
    return {"profiles": {"p": {"kind": "openai", **extra}}}


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"max_memory_per_worker_mb": -1}, "setting max_memory_per_worker_mb must be an integer >= 0, got -1"),
        ({"max_message_bytes": 0}, "setting max_message_bytes must be an integer >= 1, got 0"),
        ({"max_message_bytes": -1}, "setting max_message_bytes must be an integer >= 1, got -1"),
        ({"heartbeat_interval": 1e-9}, "setting heartbeat_interval must be a finite number >= 0.01, got 1e-09"),
        ({"heartbeat_interval": float("nan")}, "setting heartbeat_interval must be a finite number >= 0.01, got nan"),
        ({"heartbeat_interval": float("inf")}, "setting heartbeat_interval must be a finite number >= 0.01, got inf"),
        ({"drain_timeout": -1}, "setting drain_timeout must be a finite number >= 0, got -1"),
        ({"respawn_backoff_max": -1}, "setting respawn_backoff_max must be a finite number >= 0, got -1"),
        ({"max_requests_per_worker": -1}, "setting max_requests_per_worker must be an integer >= 0, got -1"),
        ({"retry_backoff": float("nan")}, "setting retry_backoff must be a finite number >= 0, got nan"),
        ({"retry_after_max": float("nan")}, "setting retry_after_max must be a finite number >= 0, got nan"),
        ({"client_rate": float("inf")}, "setting client_rate must be a finite number >= 0, got inf"),
        ({"deadline": float("inf")}, "setting deadline must be a finite number > 0, got inf"),
        ({"circuit_cooldown_max": float("inf")}, "setting circuit_cooldown_max must be a finite number > 0, got inf"),
        ({"gateway_read_timeout": 0}, "setting gateway_read_timeout must be a finite number > 0, got 0"),
        ({"coalesce_ms": float("nan")}, "setting coalesce_ms must be a finite number within 0..50, got nan"),
        (_profile(sdk_timeout=float("nan")), "profile p: sdk_timeout must be a finite number > 0, got nan"),
        (_profile(stale_timeout=-1), "profile p: stale_timeout must be a finite number > 0, got -1"),
        (_profile(concurrency=0), "profile p: concurrency must be an integer >= 1, got 0"),
        (_profile(models={"o3*": {"stale_timeout": float("nan")}}), r"profile p model 'o3\*': stale_timeout"),
        ({"models": {"o3*": {"deadline": 0}}}, r"model 'o3\*': deadline must be a finite number > 0, got 0"),
        (_profile(deployments=[{"name": "a", "weight": float("inf")}]), "deployment 'a': weight .*, got inf"),
        (_profile(deployments=[{"name": "a", "max_workers": 0}]), "deployment 'a': max_workers .* >= 1, got 0"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_setting_value_and_range(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(env={}, **kwargs)


def test_every_number_has_a_range():
    """A numeric setting added without a RANGES entry would take nan, inf and any sign unchecked."""

    def numeric(t):
        return isinstance(t, mi.IntType | mi.FloatType) or isinstance(t, mi.UnionType) and any(map(numeric, t.types))

    structs = (Settings, Profile, Deployment, ModelRule)
    fields = {f.name for s in structs for f in mi.type_info(s).fields if numeric(f.type)}
    assert fields - set(RANGES) == set()


def test_every_default_and_every_documented_zero_still_loads():
    """Each default given explicitly, and 0 where the README documents it as off / unlimited / derived."""
    defaults = {name: getattr(Settings(), name) for name in Settings.__struct_fields__}
    assert load_settings(env={}, **defaults) == Settings()
    zeros = ["client_queue_limit", "client_rate", "client_burst", "client_queue_bytes_limit", "circuit_failures",
             "max_requests_per_worker", "max_memory_per_worker_mb", "coalesce_ms", "continue_max_bytes",
             "request_log_max_bytes", "request_log_backups", "retry_backoff", "http_retry_backoff",
             "drain_timeout", "respawn_backoff_max", "retry_after_max"]  # fmt: skip
    s = load_settings(env={}, heartbeat_interval=0.01, **dict.fromkeys(zeros, 0), **_profile(min_workers=0))
    assert s.heartbeat_interval == 0.01 and all(getattr(s, name) == 0 for name in zeros)


def test_a_bad_log_level_is_refused_naming_the_levels():
    """It passed, and `isopool serve` died in logging.basicConfig with a traceback."""
    with pytest.raises(ConfigError, match="log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"):
        load_settings(env={"ISOPOOL_LOG_LEVEL": "LOUD"})
    assert load_settings(env={"ISOPOOL_LOG_LEVEL": "debug"}).log_level == "debug"


def test_a_bad_value_from_the_environment_names_its_variable():
    with pytest.raises(ConfigError, match="ISOPOOL_STALE_TIMEOUT='abc': Expected `float`"):
        load_settings(env={"ISOPOOL_STALE_TIMEOUT": "abc"})
    with pytest.raises(ConfigError, match=r"^invalid setting: Expected `float`, got `str` - at `\$.stale_timeout`$"):
        load_settings(env={"ISOPOOL_STALE_TIMEOUT": "1"}, stale_timeout="abc")  # the keyword's, not the variable's
