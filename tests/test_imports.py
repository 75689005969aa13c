"""Each process imports only what it runs: a worker and the broker no client-side module, a
worker and the zygote no SDK their profiles do not use, the command line no aiohttp and no SDK
for its help or for `stats` (issue 17)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import broker
from broker import Pool

from .conftest import TEST_SETTINGS

# Modules that run in the caller's process, the command line or the HTTP children: never in a worker.
NOT_IN_A_WORKER = (
    "broker.client",
    "broker.cli",
    "broker.http",
    "broker.server",
    "broker.shim",
    "broker.batch",
    "broker.loadtest",
    "broker.fake_provider",
)
# The broker process runs none of the library callers use, nor the command line.
NOT_IN_THE_BROKER = ("broker.client", "broker.cli", "broker.http", "broker.shim", "broker.batch", "broker.loadtest")
HEAVY = ("aiohttp", "anthropic", "openai")
PRINT_MODULES = "import atexit, sys; atexit.register(lambda: print(*sorted(sys.modules), file=sys.stderr))"


def run(code: str, *args: str) -> tuple[str, set[str]]:
    """What a fresh interpreter prints running `code` (with `args` as its argv), and the modules it then holds."""
    out = subprocess.run([sys.executable, "-c", f"{PRINT_MODULES}\n{code}", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, set(out.stderr.split())


def modules_after(code: str, *args: str) -> set[str]:
    return run(code, *args)[1]


def under(modules: set[str], packages: tuple[str, ...]) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)}


def test_a_worker_imports_no_client_side_module():
    assert not under(modules_after("import worker.main, worker.zygote"), NOT_IN_A_WORKER)


def test_the_broker_process_imports_no_client_side_module():
    assert not under(modules_after("import broker.server.serve"), NOT_IN_THE_BROKER)


def test_importing_broker_loads_none_of_its_modules():
    assert under(modules_after("import broker"), ("broker",)) == {"broker"}


def test_every_public_name_resolves_and_is_listed():
    assert set(broker.__all__) <= set(dir(broker))
    for name in broker.__all__:
        assert getattr(broker, name).__name__ == name


def test_a_public_name_loads_only_what_it_needs():
    assert not under(modules_after("from broker import ConfigError, Settings"), ("broker.client", "zmq"))


@pytest.mark.parametrize("args", [["--help"], ["stats", "--help"]])
def test_the_command_lines_help_imports_no_aiohttp_and_no_sdk(args):
    shown, loaded = run("from broker.cli import main; main()", *args)
    assert "Usage: " in shown, "no help was shown"
    assert not under(loaded, HEAVY + ("broker.client",))


def test_stats_of_a_running_broker_imports_no_aiohttp_and_no_sdk(pool):
    shown, loaded = run("from broker.cli import main; main()", "stats", "--url", pool.url)
    assert "isopool broker" in shown, "no stats were shown"
    assert not under(loaded, HEAVY + ("broker.client.pool", "broker.cli.demo"))


def test_a_worker_imports_no_sdk_until_its_profile_names_one():
    assert not under(modules_after("import worker.main, worker.zygote"), ("anthropic", "openai"))


def test_an_openai_worker_imports_no_anthropic():
    """What an openai worker runs, from the zygote's preload to building its client and translating an error."""
    code = """
from broker.config import Profile
from worker.errors import translate
from worker.main import build_client, preload
preload(("openai",))
build_client(Profile(kind="openai"))
translate(ValueError("x"))
"""
    loaded = modules_after(code)
    assert "openai" in loaded and not under(loaded, ("anthropic",))


def test_the_zygote_of_an_openai_pool_holds_no_anthropic(capfd, own_processes):
    """The zygote reports the SDKs it holds (read from its own `sys.modules`); the broker logs them."""
    settings = {**TEST_SETTINGS, "log_level": "INFO"}
    with Pool(
        profiles={"openai": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "min_workers": 1}}, **settings
    ):
        pass
    line = next((x for x in capfd.readouterr().err.splitlines() if "SDKs loaded" in x), "")
    assert line.endswith("SDKs loaded: openai"), line or "the broker logged no zygote readiness"


def test_the_shim_imports_an_sdk_only_when_a_caller_uses_it():
    """A caller of one SDK loads neither the other nor its HTTP library: an application of the older
    generation has no httpx2 at all (issue 19)."""
    assert not under(modules_after("import broker.shim"), HEAVY + ("httpx", "httpx2"))
    assert not under(modules_after("from broker.shim import openai; openai.OpenAI"), ("anthropic",))
