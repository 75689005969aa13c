"""An application pinned to the previous SDK generation (issue 19): the pins of a real agent,
anthropic 0.87 + openai 2.24 on httpx 0.28.1, in a venv of their own. Installing isopool into it
changes none of them, and the shim and `isopool run` work there unchanged, against a pool run from
this (current-generation) environment by ISOPOOL_URL, and against an embedded pool of its own.
Then the issue's own failure: the current SDKs given an httpx-era application's objects.

The venv costs one `pip install` of the pins and one of isopool (about 20-30 s on 2 cores with
PyPI's wheels; its pip cache lives in the test's tmp dir); every test of the module shares it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import httpx2
import pytest

from broker import Pool
from broker.fake_provider import FAULT_HEADER
from broker.shim import anthropic as shim_anthropic
from broker.shim.httplib import timeout_for

from .conftest import TEST_SETTINGS, profiles

# one worker builds the one old-SDK venv; 300 s: its two installs from PyPI took 97-103 s in a full suite on two
# cores, and over 120 s once
pytestmark = [pytest.mark.xdist_group("generations"), pytest.mark.timeout(300)]

# The agent of issue 19. Another set by hand, e.g. the oldest supported (which .ci/run also runs the shim,
# gateway, batch and fault tests on), or the first on httpx2:
# ISOPOOL_OLD_SDKS="$(cat tests/oldest-sdks.txt)" pytest tests/test_generations.py
# ISOPOOL_OLD_SDKS="anthropic==1.0.0 openai==3.0.0 httpx2==2.16.2" pytest tests/test_generations.py
PINS = os.environ.get("ISOPOOL_OLD_SDKS", "anthropic==0.87.0 openai==2.24.0 httpx==0.28.1").split()
PINNED = dict(pin.split("==") for pin in PINS)
# A framework pinned with them: what pip picks for anthropic 0.87 / openai 2.24 (with the default pins only).
FRAMEWORKS = () if "ISOPOOL_OLD_SDKS" in os.environ else ("langchain-anthropic==1.4.0", "langchain-openai==1.1.10")
HTTP = "httpx2" if "httpx2" in PINNED else "httpx"  # the application's own, as the scripts' `httpx`
LIBRARIES = {"anthropic", "openai", "httpx", "httpx2"}
FIRST_ON_HTTPX2 = {"anthropic": 1, "openai": 3}  # major versions


def libraries_loaded() -> list[str]:
    """The HTTP libraries a caller of the pinned SDKs holds: its own and its SDKs' (never another)."""
    return sorted({HTTP} | {"httpx2" if int(PINNED[sdk].split(".")[0]) >= major else "httpx"
                            for sdk, major in FIRST_ON_HTTPX2.items()})  # fmt: skip


ROOT = Path(__file__).resolve().parents[1]
MSG = dict(model="claude-fake", max_tokens=32, messages=[{"role": "user", "content": "an older generation"}])


def versions(python: Path) -> dict[str, str]:
    out = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    return {p["name"].lower(): p["version"] for p in json.loads(out.stdout)}


def pip_install(python: Path, env: dict[str, str], *args: str) -> None:
    # --no-compile: no .pyc of every module of the pins up front (a third of the install's CPU); what the
    # scripts import is compiled as they import it
    out = subprocess.run([python, "-m", "pip", "install", "-q", "--no-compile", *args], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def old_env(tmp_path_factory):
    """(the venv's python, its packages before isopool, after): the pins first, then isopool from a
    copy of this source tree, as an application's `pip install isopool` would add it."""
    root = tmp_path_factory.mktemp("old-sdks")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ISOPOOL_URL")}
    env |= {"PIP_CACHE_DIR": str(root / "pip-cache"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "venv", root / "venv"], check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    pip_install(python, env, *PINS, *FRAMEWORKS)
    before = versions(python)
    source = root / "isopool"
    for name in ("broker", "worker"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip_install(python, env, str(source))
    return python, before, versions(python)


@pytest.fixture(scope="module")
def served(fake):
    """A pool from this environment (current SDKs): a stall is caught after 1 s (retried before any output)."""
    settings = dict(TEST_SETTINGS, first_event_timeout=1.0, stale_timeout=1.0)
    with Pool(profiles=profiles(fake.url, min_workers=1), **settings) as pool:
        yield pool


def run_old(python: Path, args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`args` run by the old venv (its own isopool, not this tree's), in a caller's plain environment."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ISOPOOL_URL")} | env
    out = subprocess.run([str(python), *args], env=clean, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.generations
def test_installing_isopool_changes_none_of_the_applications_packages(old_env):
    python, before, after = old_env
    assert {p: after.get(p) for p in before} == before
    assert "isopool" in after and not LIBRARIES & (after.keys() - before.keys())  # no SDK or HTTP library added


_SHIM = textwrap.dedent(
    """
    import asyncio, json, sys
    import anthropic, openai
    from broker.shim import Anthropic, AsyncAnthropic, OpenAI

    MSG = dict(model="claude-fake", max_tokens=32, messages=[{"role": "user", "content": "old sdk"}])
    CHAT = dict(model="gpt-fake", messages=[{"role": "user", "content": "old sdk"}])
    seen = []
    claude = Anthropic(timeout=httpx.Timeout(900, connect=10), default_headers={"x-app": "agent"}, max_retries=1)
    own = httpx.Client(timeout=httpx.Timeout(120, connect=5), headers={"x-own": "yes"},
                       event_hooks={"request": [lambda request: seen.append(request.headers["x-own"])]})
    gpt = OpenAI(http_client=own)

    def failure_after_output(client, create, spec, **args):
        try:
            for _ in create(stream=True, extra_headers={FAULT: spec}, **args):
                pass
        except (anthropic.APIConnectionError, openai.APIConnectionError) as exc:  # their timeouts are subclasses
            return [type(exc).__name__, type(exc).__mro__[2].__module__.split(".")[0], exc.delivered >= 2]

    async def asynchronous():
        own_async = httpx.AsyncClient(headers={"x-own": "async"})
        async with AsyncAnthropic(timeout=httpx.Timeout(900, connect=10), http_client=own_async) as client:
            return [event.type async for event in await client.messages.create(stream=True, **MSG)][-1]

    print(json.dumps({
        "versions": {sdk.__name__: sdk.__version__ for sdk in (anthropic, openai, httpx)},
        "subclasses": isinstance(claude, anthropic.Anthropic) and isinstance(gpt, openai.OpenAI),
        "timeouts": [claude.timeout.as_dict(), gpt.timeout.as_dict()],
        "create": claude.messages.create(**MSG).type,
        "stream": [event.type for event in claude.messages.create(stream=True, **MSG)][-1],
        "per_call_timeout": claude.messages.create(timeout=httpx.Timeout(60), **MSG).type,
        "chat": gpt.chat.completions.create(**CHAT).object,
        "chat_stream": [chunk.object for chunk in gpt.chat.completions.create(stream=True, **CHAT)][-1],
        "async_stream": asyncio.run(asynchronous()),
        "stall_after_output": failure_after_output(claude, claude.messages.create, "stall-ping:after=3", **MSG),
        "reset_after_output": failure_after_output(gpt, gpt.chat.completions.create, "reset:after=3", **CHAT),
        "hook": seen,
        "libraries": sorted({"httpx", "httpx2"} & set(sys.modules)),
    }))
    """
)


@pytest.mark.generations
def test_the_shim_runs_streamed_and_plain_calls_under_the_pinned_sdks(old_env, served, fake, tmp_path):
    python = old_env[0]
    (tmp_path / "shim.py").write_text(f"import {HTTP} as httpx\nFAULT = {FAULT_HEADER!r}\n{_SHIM}")
    count = sum(fake.stats()["served"].values())
    out = json.loads(run_old(python, ["shim.py"], tmp_path, ISOPOOL_URL=served.url).stdout)
    assert out == {
        "versions": PINNED,
        "subclasses": True,
        "timeouts": [httpx.Timeout(900, connect=10).as_dict(), httpx.Timeout(120, connect=5).as_dict()],
        "create": "message",
        "stream": "message_stop",
        "per_call_timeout": "message",
        "chat": "chat.completion",
        "chat_stream": "chat.completion.chunk",
        "async_stream": "message_stop",
        # raised by the shim as subclasses of the pinned SDK's own classes, with what was delivered
        "stall_after_output": ["AnthropicStreamStalled", "anthropic", True],
        "reset_after_output": ["OpenAIStreamBroken", "openai", True],
        "hook": ["yes", "yes", "yes"],  # the caller's own client's hooks and headers still apply
        "libraries": libraries_loaded(),  # the shim is built on each SDK's own HTTP library, and loads no other
    }
    assert sum(fake.stats()["served"].values()) - count == 8  # each call reached the provider, once


_AGENT = textwrap.dedent(
    f"""
    import anthropic

    own = httpx.Client(headers={{"x-agent": "1"}})
    client = anthropic.Anthropic(timeout=httpx.Timeout(900, connect=10), http_client=own)
    stream = client.messages.create(model="claude-fake", max_tokens=8, stream=True,
                                    messages=[{{"role": "user", "content": "agent"}}],
                                    extra_headers={{"{FAULT_HEADER}": "stall-first:interval=0.05"}})
    print(type(client).__module__, [event.type for event in stream][-1])
    """
)


@pytest.mark.generations
@pytest.mark.parametrize("where", ["served", "embedded"])
def test_isopool_run_takes_an_agent_pinned_to_the_older_sdks(where, old_env, served, fake, tmp_path, own_processes):
    """The agent's stream stalls before its first event (pings keep it alive): on its own it would wait
    out its 900 s read timeout; through the pool it is retried after 1 s. `served`: the pool runs from
    this environment's current SDKs; `embedded`: `isopool run` starts one of the old venv's own."""
    python = old_env[0]
    (tmp_path / "agent.py").write_text(f"import {HTTP} as httpx\n{_AGENT}")
    env = {"ISOPOOL_URL": served.url} if where == "served" else {"ISOPOOL_FIRST_EVENT_TIMEOUT": "1"}
    isopool = str(python.parent / "isopool")
    out = run_old(python, [isopool, "run", "agent.py"], tmp_path, ANTHROPIC_BASE_URL=fake.url, **env)
    assert out.stdout.split() == ["broker.shim", "message_stop"]


_LANGCHAIN = textwrap.dedent(
    """
    from langchain_anthropic import ChatAnthropic
    from langchain_openai import ChatOpenAI

    claude = ChatAnthropic(model="claude-fake", max_tokens=32, default_request_timeout=900)
    gpt = ChatOpenAI(model="gpt-fake", http_client=httpx.Client(timeout=httpx.Timeout(900, connect=10)))
    print(type(claude._client).__module__, type(gpt.root_client).__module__)
    print(bool(claude.invoke("hi").content), len(list(claude.stream("hi"))) > 1, bool(gpt.invoke("hi").content))
    """
)


@pytest.mark.generations
def test_isopool_run_takes_langchain_pinned_to_the_older_sdks(old_env, fake, tmp_path, own_processes):
    """LangChain passes its own key and base URL, so the script's embedded pool (which allows them) runs it."""
    if not FRAMEWORKS:
        pytest.skip("LangChain is pinned with the default SDK pins only")
    python = old_env[0]
    (tmp_path / "lc.py").write_text(f"import {HTTP} as httpx\n{_LANGCHAIN}")
    env = {"ANTHROPIC_BASE_URL": fake.url, "OPENAI_BASE_URL": fake.url + "/v1"}
    out = run_old(python, [str(python.parent / "isopool"), "run", "lc.py"], tmp_path, **env)
    assert out.stdout.split() == ["broker.shim", "broker.shim", "True", "True", "True"]


_LANGCHAIN_SHIM = textwrap.dedent(
    """
    import asyncio

    import broker.shim
    from broker.shim import openai as shim_openai
    from langchain_anthropic import ChatAnthropic
    from langchain_openai import ChatOpenAI

    root, aroot = shim_openai.OpenAI(), shim_openai.AsyncOpenAI()  # LangChain takes an OpenAI client as given
    gpt = ChatOpenAI(model="gpt-fake", root_client=root, client=root.chat.completions,
                     root_async_client=aroot, async_client=aroot.chat.completions)
    broker.shim.install()  # ChatAnthropic builds its own: an application (a web server) installs the shim
    claude = ChatAnthropic(model="claude-fake", max_tokens=32, default_request_timeout=900)
    print(type(gpt.root_client).__module__, type(claude._client).__module__)
    print(bool(gpt.invoke("hi").content), len(list(gpt.stream("hi"))) > 1, bool(asyncio.run(gpt.ainvoke("hi")).content),
          bool(claude.invoke("hi").content), len(list(claude.stream("hi"))) > 1)
    """
)


@pytest.mark.generations
def test_langchain_pinned_to_the_older_sdks_takes_the_shims_clients(old_env, served, fake, tmp_path):
    """Through a shared pool that holds the keys: the application has none, and LangChain spells out
    the SDK's default base URL and an empty key, which are the pool's to fill."""
    if not FRAMEWORKS:
        pytest.skip("LangChain is pinned with the default SDK pins only")
    python = old_env[0]
    (tmp_path / "lc_shim.py").write_text(_LANGCHAIN_SHIM)
    count = sum(fake.stats()["served"].values())
    no_keys = {"ANTHROPIC_API_KEY": "", "OPENAI_API_KEY": ""}  # the test session's are the pool's
    out = run_old(python, ["lc_shim.py"], tmp_path, ISOPOOL_URL=served.url, **no_keys)
    assert out.stdout.split() == ["broker.shim"] * 2 + ["True"] * 5
    assert sum(fake.stats()["served"].values()) - count == 5


_JOB = textwrap.dedent(
    """
    import anthropic

    MSG = dict(model="claude-fake", max_tokens=8, messages=[{"role": "user", "content": "job"}])

    def run(line, ctx):
        claude = ctx.anthropic.with_options(timeout=httpx.Timeout(900, connect=10))
        chat = ctx.openai.chat.completions.create(model="gpt-fake", messages=MSG["messages"])
        low = ctx.pool.request("anthropic", "messages.create", **MSG).json()  # typed: the worker's SDK
        sdk = isinstance(ctx.anthropic, anthropic.Anthropic) and anthropic.__version__
        return [claude.messages.create(**MSG).type, chat.object, low["type"], sdk]
    """
)


@pytest.mark.generations
def test_a_batch_job_gets_clients_of_the_pinned_sdks(old_env, served, tmp_path):
    python = old_env[0]
    (tmp_path / "job.py").write_text(f"import {HTTP} as httpx\n{_JOB}")
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a"}\n')
    isopool = str(python.parent / "isopool")
    run_old(
        python, [isopool, "batch", "in.jsonl", "-o", "out.jsonl", "--job", "job:run"], tmp_path, ISOPOOL_URL=served.url
    )
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert record["result"] == {
        "type": "succeeded",
        "output": ["message", "chat.completion", "message", PINNED["anthropic"]],
    }


def test_the_current_sdks_take_an_httpx_era_applications_timeout_and_client(served):
    """The issue's failure: anthropic >= 1.4 refuses httpx objects (its library is httpx2). The shim
    converts the constructor's and each call's `httpx.Timeout`, and takes what applies of an `httpx.Client`."""
    seen = []
    own = httpx.Client(timeout=httpx.Timeout(120, connect=5), headers={"x-own": "yes"},
                       event_hooks={"request": [lambda request: seen.append(request.headers["x-own"])]})  # fmt: skip
    with (
        shim_anthropic.Anthropic(pool=served, timeout=httpx.Timeout(900, connect=10)) as claude,
        shim_anthropic.Anthropic(pool=served, http_client=own) as mine,
    ):
        assert claude.timeout == httpx2.Timeout(900, connect=10)
        assert claude.messages.create(timeout=httpx.Timeout(60), **MSG).type == "message"
        assert claude.with_options(timeout=httpx.Timeout(30)).timeout == httpx2.Timeout(30)
        assert mine.timeout == httpx2.Timeout(120, connect=5)
        assert [event.type for event in mine.messages.create(stream=True, **MSG)][-1] == "message_stop"
    assert seen == ["yes"]


@pytest.mark.parametrize("given, lib", [(httpx, httpx2), (httpx2, httpx)])
def test_a_timeout_of_the_other_library_is_converted_though_an_sdk_renamed_its_class(given, lib, monkeypatch):
    """anthropic 0.x re-exports httpx.Timeout as `anthropic.Timeout`, and sets its `__module__` to
    "anthropic" (as openai 3.x does httpx2's): an env holding anthropic 0.87 and openai 3.x has both."""
    monkeypatch.setattr(given.Timeout, "__module__", "anthropic")
    converted = timeout_for(given.Timeout(900, connect=10), lib)
    assert type(converted) is lib.Timeout and converted.as_dict() == given.Timeout(900, connect=10).as_dict()
    assert timeout_for(lib.Timeout(5), lib) == lib.Timeout(5)
    assert timeout_for(30.0, lib) == 30.0
