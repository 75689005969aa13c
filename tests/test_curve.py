"""A tcp:// frontend requires CURVE: allowed clients get through, others never reach the
broker (and get BrokerUnavailable, not a hang); without keys it needs --insecure, and then
the broker says so in its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from broker import BrokerRefused, BrokerUnavailable, Pool
from broker.config import ConfigError, load_settings
from broker.wire.curve import keygen

from .conftest import TEST_SETTINGS, anthropic_args, profiles

ISOPOOL = os.path.join(os.path.dirname(sys.executable), "isopool")


def test_a_tcp_frontend_without_curve_keys_is_refused_unless_insecure(tmp_path):
    with pytest.raises(ConfigError, match="isopool keygen"):
        load_settings(frontend="tcp://127.0.0.1:5555")
    assert load_settings(frontend="tcp://127.0.0.1:5555", insecure=True).insecure
    with pytest.raises(ConfigError, match="together"):
        load_settings(frontend="tcp://127.0.0.1:5555", curve_server_key=str(tmp_path / "broker.key_secret"))
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keygen(str(keys), "broker")
    allowed.mkdir()
    curve = {"frontend": "tcp://127.0.0.1:*", "curve_clients_dir": str(allowed)}
    with pytest.raises(ConfigError, match="no client public keys"):  # nobody could ever connect
        Pool(curve_server_key=str(keys / "broker.key_secret"), **curve, **TEST_SETTINGS)
    keygen(str(keys), "alice")
    (allowed / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    with pytest.raises(ConfigError, match="no secret key"):  # the public half given by mistake
        Pool(curve_server_key=str(keys / "broker.key"), **curve, **TEST_SETTINGS)
    with pytest.raises(ConfigError, match="cannot read"):
        Pool(curve_server_key=str(keys / "nobody.key_secret"), **curve, **TEST_SETTINGS)


def test_keygen_writes_a_private_secret_half(tmp_path):
    run = subprocess.run([ISOPOOL, "keygen", str(tmp_path / "k"), "--name", "alice"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "k" / "alice.key_secret").st_mode & 0o777 == 0o600
    assert "secret-key" in (tmp_path / "k" / "alice.key_secret").read_text()
    assert "secret-key" not in (tmp_path / "k" / "alice.key").read_text()


@pytest.fixture
def curve(tmp_path):
    """Keys for a broker, an allowed client (alice) and an outsider (mallory)."""
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("broker", "alice", "mallory"):
        keygen(str(keys), name)
    (allowed / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    settings = dict(TEST_SETTINGS, frontend="tcp://127.0.0.1:*", curve_server_key=str(keys / "broker.key_secret"),
                    curve_clients_dir=str(allowed))  # fmt: skip
    return keys, settings


def test_curve_admits_the_allowed_clients_only(fake, curve, monkeypatch):
    keys, settings = curve

    def as_client(name: str | None) -> None:
        for var in ("ISOPOOL_CLIENT_KEY", "ISOPOOL_BROKER_KEY"):
            monkeypatch.delenv(var, raising=False)
        if name:
            monkeypatch.setenv("ISOPOOL_CLIENT_KEY", str(keys / f"{name}.key_secret"))
            monkeypatch.setenv("ISOPOOL_BROKER_KEY", str(keys / "broker.key"))

    as_client("alice")  # the pool's own readiness check is a client too
    with Pool(profiles=profiles(fake.url), **settings) as pool:
        assert pool.url.startswith("tcp://127.0.0.1:") and not pool.url.endswith("*")
        with pool.client() as client:
            assert client.request("anthropic", "messages.create", **anthropic_args("hello")).json()["content"]
        served = fake.stats()["completed"]
        for outsider in ("mallory", None):  # a key the broker does not know; no CURVE at all
            as_client(outsider)
            # the handshake says why: a key it does not know refused; a keyless client refused or dropped, told to set
            # its keys (it was told its key was refused, naming a key it had not set)
            refused, error = (
                ("curve_clients_dir", BrokerRefused) if outsider else ("ISOPOOL_CLIENT_KEY", BrokerUnavailable)
            )
            # a refused handshake ends the call at the refusal; the margin is for a loaded machine's handshake
            with pool.client(broker_timeout=5.0) as client, pytest.raises(error, match=refused):
                client.request("anthropic", "messages.create", **anthropic_args(f"from {outsider}"))
        stats = subprocess.run([ISOPOOL, "stats", "--url", pool.url], capture_output=True, text=True, timeout=60)
        assert stats.returncode == 1 and "this one has none: set ISOPOOL_CLIENT_KEY" in stats.stderr, stats.stderr
        assert fake.stats()["completed"] == served  # nothing of theirs reached the provider


def test_a_key_refused_before_the_first_call_still_says_why(fake, curve, monkeypatch):
    """The refusal can come before the client's first call (a loaded machine, a client made early):
    the call then finds no connection at all, and must still say the key was refused."""
    keys, settings = curve
    monkeypatch.setenv("ISOPOOL_CLIENT_KEY", str(keys / "alice.key_secret"))
    monkeypatch.setenv("ISOPOOL_BROKER_KEY", str(keys / "broker.key"))
    with Pool(profiles=profiles(fake.url), **settings) as pool:
        monkeypatch.setenv("ISOPOOL_CLIENT_KEY", str(keys / "mallory.key_secret"))
        with pool.client(broker_timeout=5.0) as client:
            time.sleep(1.0)  # the handshake is refused meanwhile
            with pytest.raises(BrokerUnavailable, match="curve_clients_dir"):
                client.request("anthropic", "messages.create", **anthropic_args("too late"))


REFUSED_CLIENTS = """
import sys
from broker import BrokerUnavailable, Client
for i in range(200):
    with Client(sys.argv[1], broker_timeout=2.0) as client:
        try:
            client.request("anthropic", "messages.create", model="m", max_tokens=1, messages=[])
        except BrokerUnavailable:
            pass
print("closed", i + 1)
"""


def test_a_refused_client_always_closes(fake, curve, monkeypatch):
    """Closing a client the broker refused once hung in libzmq (its connection monitor stopped after the
    monitor's reader was gone, while refusals kept coming; about 1 close in 600). In a child process,
    so a hang that holds the interpreter fails this test rather than the whole run."""
    keys, settings = curve
    monkeypatch.setenv("ISOPOOL_CLIENT_KEY", str(keys / "alice.key_secret"))
    monkeypatch.setenv("ISOPOOL_BROKER_KEY", str(keys / "broker.key"))
    with Pool(profiles=profiles(fake.url), **settings) as pool:
        env = dict(os.environ, ISOPOOL_CLIENT_KEY=str(keys / "mallory.key_secret"))
        run = subprocess.run([sys.executable, "-c", REFUSED_CLIENTS, pool.url], env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0 and "closed 200" in run.stdout, run.stderr[-2000:]


def test_an_insecure_tcp_frontend_logs_a_warning(tmp_path):
    env = dict(os.environ, ISOPOOL_RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.Popen(
        [ISOPOOL, "serve", "--frontend", "tcp://127.0.0.1:*", "--insecure"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        banner = proc.stdout.readline()  # type: ignore[union-attr]
        assert "serving on tcp://127.0.0.1:" in banner
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "no CURVE authentication" in err


def test_keygen_keeps_secrets_private_whatever_the_umask_and_never_overwrites_one(tmp_path):
    """With umask 000 the secret used to be written world-readable, then chmodded; an existing
    directory kept its mode; and a second run replaced a key pair already handed out."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o755)
    keys.chmod(0o755)
    run = [sys.executable, "-c", "import os, sys; os.umask(0); from broker.cli import main; main()",
           "keygen", str(keys), "--name", "alice"]  # fmt: skip
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert os.stat(keys).st_mode & 0o777 == 0o700
    secret = keys / "alice.key_secret"
    assert os.stat(secret).st_mode & 0o777 == 0o600
    before = secret.read_text()
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists already" in again.stderr
    assert secret.read_text() == before
