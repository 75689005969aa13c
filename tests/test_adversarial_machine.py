"""Trust on the machine itself: a provider key goes only where it belongs, and the pool's run
directory cannot be redirected by a link another user planted.

- `isopool loadtest --target URL` sends no provider key to that URL unless told which one to send
  (`--api-key-env NAME`); a name that is not set is refused before anything runs.
- `run_dir` refuses a symlink and a directory owned by another user, and never changes the mode
  of what a link points to.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from broker import Pool
from broker.endpoints import RunDirLock, UnsafeRunDir, cleanup, ensure_private_dir
from broker.errors import WorkerConfigError
from broker.fake_provider import FakeProviderProcess
from broker.loadtest import Options, run

from .conftest import wait_for

PROVIDER_KEYS = (os.environ["ANTHROPIC_API_KEY"], os.environ["OPENAI_API_KEY"])  # set by conftest
ISOPOOL = [sys.executable, "-c", "from broker.cli import main; main()"]


def received_headers(fake: FakeProviderProcess, requests: int) -> list[dict[str, str]]:
    """The headers of the fake's first answers (it numbers them from 1)."""
    headers = []
    for number in range(1, requests + 1):
        with urllib.request.urlopen(f"{fake.url}/_isopool/requests/req_fake_{number:08d}", timeout=10) as resp:
            headers.append(json.load(resp))
    return headers


def test_loadtest_sends_no_provider_key_to_a_url_target(tmp_path, own_processes):
    with FakeProviderProcess() as fake:
        options = Options(calibrate=False, target=fake.url + "/v1", concurrency=[1], requests=2, output_tokens="4")
        assert run(options, str(tmp_path))["points"][0]["summary"]["outcomes"] == {"ok": 2}
        headers = received_headers(fake, 2)
    for sent in headers:
        assert sent["authorization"] == "Bearer EMPTY"  # the OpenAI SDK needs one; servers without keys take any
        assert not any(key in value for key in PROVIDER_KEYS for value in sent.values())


def test_loadtest_sends_the_key_named_by_api_key_env_to_a_url_target(tmp_path, own_processes):
    with FakeProviderProcess() as fake:
        command = ISOPOOL + ["loadtest", "--target", fake.url + "/v1", "--api-key-env", "MY_SERVER_KEY", "-c", "1",
                             "-n", "2", "--output-tokens", "4", "--no-calibrate", "--json",
                             "-o", str(tmp_path)]  # fmt: skip
        result = subprocess.run(command, env=dict(os.environ, MY_SERVER_KEY="sk-my-server"), capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr
        headers = received_headers(fake, 2)
    assert [sent["authorization"] for sent in headers] == ["Bearer sk-my-server"] * 2
    assert json.loads(result.stdout)["options"]["api_key_env"] == "MY_SERVER_KEY"  # the name is recorded, not the key
    assert "sk-my-server" not in (tmp_path / "results.json").read_text()


@pytest.mark.parametrize(
    "target, name, error",
    [
        ("http://127.0.0.1:9/v1", "ISOPOOL_TEST_UNSET_KEY", "ISOPOOL_TEST_UNSET_KEY is not set"),
        ("fake", "OPENAI_API_KEY", "the fake provider takes no key"),
    ],
)
def test_loadtest_refuses_an_api_key_env_it_cannot_use_before_anything_runs(tmp_path, target, name, error):
    command = ISOPOOL + ["loadtest", "--target", target, "--api-key-env", name, "-o", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and error in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target, own", [("anthropic", "ANTHROPIC_API_KEY"), ("openai", "OPENAI_API_KEY")])
def test_loadtest_against_a_provider_without_its_key_is_refused_before_anything_runs(tmp_path, target, own):
    """It ran keyless: every request failed, and the verdict said the generator was the limit."""
    command = ISOPOOL + ["loadtest", "--target", target, "-n", "1", "-o", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != own}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"--target {target} sends the key in {own}, which is not set" in result.stderr
    assert not (tmp_path / "out").exists()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making files another user owns needs root")
NOBODY = 65534


@needs_root
def test_run_dir_refuses_another_users_symlink_and_leaves_its_target_alone(tmp_path):
    victim = tmp_path / "victim"  # say, the user's own ~/.ssh
    victim.mkdir(mode=0o755)
    victim.chmod(0o755)
    link = tmp_path / "isopool-run"
    link.symlink_to(victim)
    os.lchown(link, NOBODY, NOBODY)  # planted by another user in a shared /tmp
    with pytest.raises(UnsafeRunDir, match=f"{link} is a symlink.*remove it"):
        ensure_private_dir(str(link))
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755


def test_run_dir_refuses_a_dangling_symlink_with_what_to_do(tmp_path):
    link = tmp_path / "isopool-run"
    link.symlink_to(tmp_path / "not-yet")  # where a later `mkdir` by its owner would put our sockets
    with pytest.raises(UnsafeRunDir, match=f"{link} is a symlink.*remove it"):
        ensure_private_dir(str(link))
    assert not (tmp_path / "not-yet").exists()


@needs_root
def test_run_dir_refuses_a_directory_another_user_owns_and_leaves_its_mode(tmp_path):
    theirs = tmp_path / "isopool-run"
    theirs.mkdir(mode=0o755)
    theirs.chmod(0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafeRunDir, match=f"{theirs} belongs to uid {NOBODY}"):
        ensure_private_dir(str(theirs))
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o755


def test_run_dir_is_created_private_and_an_own_open_one_is_refused(tmp_path):
    made = ensure_private_dir(str(tmp_path / "a" / "run"))
    assert stat.S_IMODE(os.lstat(made).st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # others may already have put sockets in it
    with pytest.raises(UnsafeRunDir, match="writable by others"):
        ensure_private_dir(str(shared))


# a second `isopool serve` ---------------------------------------------------------------


def _serve(tmp_path, *args: str) -> subprocess.Popen:
    """`isopool serve` with its run dir under `tmp_path` (the same for every call) and one dormant profile."""
    config = tmp_path / "isopool.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\n[profiles.openai]\nkind = "openai"\n'
                      'base_url = "http://127.0.0.1:9/v1"\nmin_workers = 0\n')  # fmt: skip
    return subprocess.Popen([*ISOPOOL, "serve", "--config", str(config), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _stats_pid(url: str) -> int:
    from broker.client.client import Client

    with Client(url, broker_timeout=5.0) as client:
        return client.snapshot().pid


def test_a_second_serve_in_the_same_run_dir_is_refused_and_the_first_keeps_its_sockets(tmp_path, own_processes):
    """Binding an ipc socket replaces the file of one that exists: a second broker took over the first's
    sockets, left it running unreachable, and removed the directory when it stopped."""
    first = _serve(tmp_path)
    try:
        banner = first.stdout.readline()
        assert "serving on ipc://" in banner, first.stderr.read()
        url = banner.split("serving on ", 1)[1].split()[0]
        second = _serve(tmp_path)
        try:
            out, err = second.communicate(timeout=60)
        finally:
            second.kill()  # if it started after all (it did before): its zygote follows it
            second.wait()
        assert second.returncode == 1 and not out, (out, err)
        assert f"a broker (pid {first.pid}) is already serving in {tmp_path / 'run'}" in err, err
        assert "ISOPOOL_RUN_DIR" in err and "Traceback" not in err, err
        assert _stats_pid(url) == first.pid  # still the first one's sockets
    finally:
        first.terminate()
        first.communicate(timeout=60)
    assert first.returncode == 0 and not (tmp_path / "run").exists()  # its lock went with its sockets
    again = _serve(tmp_path)  # and the directory is free for the next
    try:
        assert "serving on ipc://" in again.stdout.readline()
    finally:
        again.terminate()
        again.communicate(timeout=60)


def test_a_serve_whose_gateway_port_is_taken_says_so_without_a_traceback(tmp_path, own_processes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = _serve(tmp_path, "--http", f"127.0.0.1:{port}")
        out, err = serve.communicate(timeout=60)
    assert serve.returncode == 1 and "serving on" not in out, (out, err)
    assert f"cannot listen on http://127.0.0.1:{port}: Address already in use" in err, err
    assert "cannot start the broker" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_fake_provider_whose_port_is_taken_says_so_without_a_traceback():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fake = subprocess.run([*ISOPOOL, "fake-provider", "--port", str(port)], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
    assert fake.returncode == 1 and "Traceback" not in fake.stderr, fake.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in fake.stderr, fake.stderr


def test_an_ipv6_gateway_address_in_brackets_is_served_there(tmp_path, own_processes):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    serve = _serve(tmp_path, "--http", "[::1]:0")
    try:
        banner = serve.stdout.readline() + serve.stdout.readline() + serve.stdout.readline()
        assert "HTTP gateway: base_url http://[::1]:" in banner, (banner, serve.stderr.read() if serve.poll() else "")
        gateway = banner.split("base_url ", 1)[1].split()[0]
        try:
            with urllib.request.urlopen(gateway + "/v1/models", timeout=20) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert status == 502  # the gateway's answer: its profile's provider (port 9) is unreachable
    finally:
        serve.terminate()
        serve.communicate(timeout=60)


def test_a_gateway_that_dies_is_started_again_at_its_address(tmp_path, own_processes):
    """The OOM killer's choice or a crash: the gateway's port refused every caller from then on while the broker
    looked healthy. It is started again, at the port it had bound (one asked as :0 too), and says so."""
    serve = _serve(tmp_path, "--http", "127.0.0.1:0")
    try:
        banner = "".join(serve.stdout.readline() for _ in range(3))
        gateway = banner.split("base_url ", 1)[1].split()[0]

        def child() -> psutil.Process | None:
            found = [p for p in psutil.Process(serve.pid).children() if "broker.http.gateway" in p.cmdline()]
            return found[0] if found else None

        def answers() -> bool:
            try:
                urllib.request.urlopen(gateway + "/v1/models", timeout=5)
            except urllib.error.HTTPError as exc:
                return exc.code == 502  # the gateway's own answer: its profile's provider (port 9) is unreachable
            except OSError:
                return False
            return False

        assert answers()
        first = child()
        first.kill()
        first.wait(10)
        wait_for(lambda: (c := child()) is not None and c.pid != first.pid and answers(), 30, "the gateway again")
    finally:
        serve.terminate()
        out, err = serve.communicate(timeout=60)
    assert serve.returncode == 0, err
    assert f"broker.http.gateway (pid {first.pid}) exited with code -9; starting it again" in err, err
    assert "broker.http.gateway serving again at " + gateway in err, err


def test_a_profiles_unset_api_key_env_is_named_and_the_sdks_own_key_never_sent_in_its_place(own_processes):
    """A profile naming its key's variable, unset: the SDK fell back to its own (OPENAI_API_KEY), sending
    that key to the profile's upstream, or, with none, blamed OPENAI_API_KEY, never the variable named."""
    with FakeProviderProcess() as fake:
        profile = {"local": {"kind": "openai", "base_url": fake.url + "/v1", "api_key_env": "ISOPOOL_TEST_UNSET_KEY",
                             "min_workers": 1}}  # fmt: skip
        with Pool(profiles=profile) as pool, pool.client() as client:
            with pytest.raises(
                WorkerConfigError, match="ISOPOOL_TEST_UNSET_KEY .the profile's api_key_env. is not set"
            ):
                client.request("local", "chat.completions.create", model="gpt-fake",
                               messages=[{"role": "user", "content": "hi"}])  # fmt: skip
        assert fake.stats()["arrivals"] == {}  # nothing went upstream, with any key


def test_a_broker_starting_while_a_killed_ones_zygote_cleans_up_takes_the_directory_again(tmp_path):
    """The zygote of a killed broker holds the lock while it removes that broker's files, then the directory:
    a broker waiting for the lock meanwhile failed with ENOENT instead of starting."""
    run = ensure_private_dir(str(tmp_path / "run"))
    held = RunDirLock.free(run)  # as the zygote takes it

    def zygote() -> None:
        time.sleep(0.2)
        cleanup(run, lock=held)  # the lock's file, then the directory (empty)

    thread = threading.Thread(target=zygote)
    thread.start()
    lock = RunDirLock.take(run)
    thread.join()
    try:
        assert os.path.isdir(run) and open(os.path.join(run, "broker.lock")).read() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_an_anthropic_profile_with_no_key_anywhere_says_so_and_sends_nothing(own_processes, monkeypatch):
    """No api_key_env and no ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) in the pool's environment: every call
    was a BadRequest, the SDK's "Could not resolve authentication method", as if the caller had erred, and the
    shim's went upstream with the shim's stand-in key."""
    import anthropic

    from broker import shim

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    unset = "no API key.*ANTHROPIC_API_KEY.*api_key_env"
    ask = {"model": "claude-fake", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    with FakeProviderProcess() as fake:
        profile = {"local": {"kind": "anthropic", "base_url": fake.url, "min_workers": 1}}
        with Pool(profiles=profile) as pool, pool.client() as client:
            with pytest.raises(WorkerConfigError, match=unset):
                client.request("local", "messages.create", **ask)
            with pytest.raises(anthropic.APIConnectionError, match=unset):
                shim.Anthropic(pool=pool, pool_profile="local").messages.create(**ask)
        assert fake.stats()["arrivals"] == {}


@pytest.mark.parametrize("header", [{"x-api-key": "sk-in-headers"}, {"Authorization": "Bearer sk-in-headers"}])
def test_an_anthropic_profile_whose_key_is_in_its_default_headers_is_not_refused(own_processes, monkeypatch, header):
    """A review's finding against the check above: the SDK takes a key header (the profile's default_headers,
    ANTHROPIC_CUSTOM_HEADERS) as credentials, and such a profile was refused as keyless."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    with FakeProviderProcess() as fake:
        profile = {"local": {"kind": "anthropic", "base_url": fake.url, "min_workers": 1, "default_headers": header}}
        with Pool(profiles=profile) as pool, pool.client() as client:
            answer = client.request("local", "messages.create", model="claude-fake", max_tokens=8,
                                    messages=[{"role": "user", "content": "hi"}])  # fmt: skip
        assert answer.status == 200
        assert sum(len(times) for times in fake.stats()["arrivals"].values()) == 1
