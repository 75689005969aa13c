"""The pool's life cycle, end to end: recycling, scale-down, deadlines, backpressure, zygote
loss, the SDKs' own environment variables, and `isopool serve`/`stats` with a graceful drain."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import psutil
import pytest

from broker import BrokerUnavailable, Client, DeadlineExceeded, Pool, PoolSaturated, ShuttingDown
from broker.config import load_settings
from broker.processes import Child, ChildFailed, running
from broker.protocol import PROTOCOL_VERSION, Listening, Ready, Submit
from broker.server.broker import Broker
from broker.server.fleet import RETRY_FIRST, Fleet
from broker.server.state import Reason, Worker
from broker.server.stats import Stats
from broker.server.watchdog import Alarm
from broker.server.zygote import Zygote

from .conftest import (
    TEST_SETTINGS,
    anthropic_args,
    assert_dead,
    fault,
    openai_args,
    profile_pids,
    profiles,
    settled,
    wait_for,
    worker_pids,
)

ISOPOOL = os.path.join(os.path.dirname(sys.executable), "isopool")


def one_profile(fake, **extra):
    return {"anthropic": profiles(fake.url)["anthropic"] | {"min_workers": 1, "spare_workers": 0, **extra}}


LIMITED = pytest.mark.xdist_group(f"{__name__}.limited")  # the tests of `limited`: its pool started once, on one worker


@pytest.fixture(scope="module")
def _limited(fake):
    with Pool(profiles=one_profile(fake, max_workers=1) | {"recycled": one_profile(fake)["anthropic"]},
              max_requests_per_worker=3, queue_limit=3, **TEST_SETTINGS) as pool:  # fmt: skip
        yield pool


@pytest.fixture
def limited(_limited):
    """The pool of the LIMITED tests, started once for them all: max_requests_per_worker=3 and queue_limit=3, a
    profile `anthropic` of one worker at most and one `recycled`. Each test gets it as a new one starts (nothing
    in flight, its workers ready) and counts what it causes from the counts it finds."""
    return settled(_limited)


@LIMITED
def test_max_requests_per_worker_recycles_workers(limited, own_processes):
    with limited.client() as c:
        before = c.stats()
        seen = set()
        for i in range(7):
            seen |= profile_pids(c, "recycled")
            assert c.request("recycled", "messages.create", **anthropic_args(f"recycle {i}")).status == 200
        seen |= wait_for(lambda: profile_pids(c, "recycled"), 10, "a worker")
        assert c.stats()["kills"]["max_requests"] == before["kills"].get("max_requests", 0) + 2
        assert len(seen) == 3  # 3 + 3 + 1 requests on three successive workers
        assert c.stats()["requests"]["ok"] == before["requests"].get("ok", 0) + 7


def test_idle_workers_beyond_min_and_spares_are_retired(fake, own_processes):
    settings = dict(TEST_SETTINGS, idle_timeout=0.3)
    with Pool(profiles=one_profile(fake, max_workers=4), **settings) as pool, pool.client() as c:
        calls = [
            c.submit("anthropic", "messages.create", **anthropic_args(f"burst {i}"), **fault("slow-first:delay=1"))
            for i in range(4)
        ]
        wait_for(lambda: len(c.stats()["workers"]) == 4, 20, "the pool to grow to max_workers for the burst")
        pids = set(worker_pids(c).values())
        assert all(call.result().status == 200 for call in calls)
        wait_for(lambda: len(c.stats()["workers"]) == 1, 20, "idle workers to be retired down to min_workers")
        assert c.stats()["kills"]["scale_down"] == 3
        assert c.stats()["respawns"] == 0  # retiring is not replacing
        assert_dead(pids - set(worker_pids(c).values()))


def test_deadline_ends_a_slow_request_across_retries(client):
    args = anthropic_args("deadline")
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        client.request("anthropic", "messages.create", deadline=0.8, **args, **fault("drip:gap=0.2,times=9"))
    assert 0.7 < time.monotonic() - start < 5
    assert caught.value.code == "deadline"
    # the worker that was still streaming it is killed, and the pool keeps serving
    assert client.request("anthropic", "messages.create", **args).status == 200


@LIMITED
def test_burst_beyond_queue_limit_is_refused_as_saturated_never_lost(limited, own_processes):
    with limited.client() as c:
        calls = [
            c.submit("anthropic", "messages.create", **anthropic_args(f"burst {i}"), **fault("slow-first:delay=0.2"))
            for i in range(10)
        ]
        outcomes = []
        for call in calls:
            try:
                outcomes.append(call.result().status)
            except PoolSaturated as exc:
                assert "queue_limit" in str(exc)
                outcomes.append("saturated")
        assert outcomes.count(200) == 3 and outcomes.count("saturated") == 7
        stats = c.stats()
        assert stats["in_flight"] == 0 and stats["queued"] == {"anthropic": 0, "recycled": 0}


def test_spawn_requests_never_block_on_a_hung_zygote(own_processes):
    """A SIGSTOPped zygote stops reading its pipe; 200 spawn requests (~100 KB, more than a
    pipe holds) are kept in an outbox instead of blocking the broker's loop."""
    death_r, death_w = os.pipe()
    zygote = Zygote(death_r)
    zygote.start()
    try:
        os.kill(zygote.pid, signal.SIGSTOP)
        spec = {"ident": "anthropic.0.0", "padding": "x" * 500}
        start = time.monotonic()
        assert all(zygote.spawn(spec) for _ in range(200))
        assert time.monotonic() - start < 2.0 and zygote.outbox  # the rest waits
        os.kill(zygote.pid, signal.SIGCONT)
    finally:
        zygote.stop()
        os.close(death_r)
        os.close(death_w)


def test_killed_zygote_is_restarted_and_spawns_continue(client):
    before = client.stats()
    old_zygote = before["zygote_pid"]
    os.kill(old_zygote, signal.SIGKILL)
    wait_for(lambda: client.stats()["zygote_pid"] != old_zygote, 10, "a new zygote")
    # a crash now needs a fork from the new zygote
    victim = next(w for w in client.stats()["workers"] if w["profile"] == "openai")
    os.kill(victim["pid"], signal.SIGKILL)
    args = openai_args("after zygote loss")
    assert client.request("openai", "chat.completions.create", **args).status == 200
    wait_for(
        lambda: any(w["profile"] == "openai" and w["pid"] not in (victim["pid"], 0) for w in client.stats()["workers"]),
        10,
        "the crashed worker to be replaced by the new zygote",
    )
    assert client.stats()["zygote_restarts"] == before["zygote_restarts"] + 1
    assert_dead({old_zygote, victim["pid"]})


def test_hung_zygote_is_replaced_when_a_spawn_times_out(fake, own_processes):
    settings = dict(TEST_SETTINGS, startup_timeout=1.0)
    with Pool(profiles=one_profile(fake), **settings) as pool, pool.client() as c:
        zygote = c.stats()["zygote_pid"]
        os.kill(zygote, signal.SIGSTOP)
        (worker,) = c.stats()["workers"]
        os.kill(worker["pid"], signal.SIGKILL)
        args = anthropic_args("hung zygote")
        assert c.request("anthropic", "messages.create", **args).status == 200
        stats = c.stats()
        assert stats["zygote_restarts"] == 1 and stats["zygote_pid"] != zygote
        assert_dead({zygote})


def test_a_tight_worker_startup_timeout_does_not_bound_the_brokers_own_start(fake, own_processes):
    """startup_timeout is a worker's limit: at 0.05 s the broker (which takes longer to import and bind) still starts
    (it was its start's limit too: "the pool's broker did not start within 1s" on a loaded machine)."""
    with Pool(profiles=one_profile(fake), **dict(TEST_SETTINGS, startup_timeout=0.05)).start(wait=False) as pool:
        assert running({pool.pid}) == {pool.pid}


def test_sdk_environment_variables_drive_the_default_profiles(fake, own_processes, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url + "/v1")
    served = sum(fake.stats()["served"].values())
    with Pool(**TEST_SETTINGS) as pool, pool.client() as c:
        assert sorted(pool.settings.profiles) == ["anthropic", "openai"]
        assert pool.settings.profiles["anthropic"].base_url is None  # left to the SDK, as without isopool
        assert c.request("anthropic", "messages.create", **anthropic_args("env")).status == 200
        assert c.request("openai", "chat.completions.create", **openai_args("env")).status == 200
    assert sum(fake.stats()["served"].values()) == served + 2


class _FakeZygote:
    """Stands in for the zygote process in a unit test of the broker's spawn policy."""

    def __init__(self) -> None:
        self.spawns: list[str] = []
        self.pid = 0

    def spawn(self, spec) -> bool:
        self.spawns.append(spec.ident)
        return True

    def stop(self) -> None:
        pass


def test_flapping_profile_backs_off_then_fails_its_queue(tmp_path):
    """Every worker of a profile dies at start: spawns space out exponentially instead of
    looping, and once the profile counts as flapping its queued requests get a clear error."""
    settings = load_settings(profiles={"p": {"kind": "openai", "min_workers": 1}}, run_dir=str(tmp_path / "run"))
    broker = Broker(settings)
    broker.fleet.zygote = _FakeZygote()
    try:
        spawned_at = []
        now = 100.0
        while now < 104.0:
            broker.reconcile(now)
            for worker in list(broker.fleet.workers.values()):
                spawned_at.append(now)
                broker.fleet.spawn_failures["p"] += 1
                broker.fleet.kill(worker, Reason.STARTUP, now)
            now += 0.01
        gaps = [round(b - a, 2) for a, b in itertools.pairwise(spawned_at)]
        assert gaps[1:] == [0.1, 0.2, 0.4, 0.8, 1.6], gaps  # 7 spawns in 4 s, not 400
        broker.flow.on_submit(b"caller", Submit(rid=1, profile="p", model="m"), b"{}", now)
        broker.reconcile(now + 10)
        assert broker.stats.requests["error:config"] == 1  # a flapping profile refuses, it does not hang
        assert not broker.flow.requests
    finally:
        broker.close()


# isopool serve / stats ------------------------------------------------------------


def _start_serve(tmp_path, fake, **settings):
    run_dir = tmp_path / "run"
    config = tmp_path / "isopool.toml"
    lines = [f'run_dir = "{run_dir}"'] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["[profiles.anthropic]", 'kind = "anthropic"', f'base_url = "{fake.url}"', "min_workers = 1"]
    config.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([ISOPOOL, "serve", "--config", str(config)], stdout=subprocess.PIPE, text=True)
    banner = proc.stdout.readline()
    assert "serving on ipc://" in banner, banner
    url = banner.split("serving on ", 1)[1].split()[0]
    return proc, url


def test_serve_and_stats_then_sigterm_drains_in_flight_requests(tmp_path, fake, own_processes):
    proc, url = _start_serve(tmp_path, fake, heartbeat_interval=0.1, drain_timeout=20)
    try:
        with Client(url) as c:
            wait_for(lambda: any(w["state"] == "ready" for w in c.stats()["workers"]), 20, "a ready worker")
            out = subprocess.run([ISOPOOL, "stats", "--url", url, "--json"], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["pid"] == proc.pid
            table = subprocess.run([ISOPOOL, "stats", "--url", url], capture_output=True, text=True)
            assert table.returncode == 0 and "anthropic" in table.stdout
            family = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}

            args = anthropic_args("drain")
            in_flight = c.submit("anthropic", "messages.create", **args, **fault("slow-first:delay=1"))
            wait_for(lambda: c.stats()["in_flight"] == 1, 10, "the request to be running")
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: c.stats()["draining"], 10, "the broker to start draining")
            with pytest.raises(ShuttingDown):
                c.request("anthropic", "messages.create", **anthropic_args("too late"))
            assert in_flight.result().status == 200  # finished, not cut off
        assert proc.wait(20) == 0
        assert_dead(family)
        assert not (tmp_path / "run" / "frontend.sock").exists()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_drain_timeout_ends_requests_that_do_not_finish(tmp_path, fake, own_processes):
    proc, url = _start_serve(tmp_path, fake, heartbeat_interval=0.1, drain_timeout=0.5)
    try:
        with Client(url) as c:
            wait_for(lambda: any(w["state"] == "ready" for w in c.stats()["workers"]), 20, "a ready worker")
            stuck = c.submit("anthropic", "messages.create", **anthropic_args("stuck"), **fault("silent:after=0"))
            wait_for(lambda: c.stats()["in_flight"] == 1, 10, "the request to be running")
            answers: list[BaseException] = []
            waiter = threading.Thread(target=lambda: answers.append(_error_of(stuck.result)))
            waiter.start()
            proc.send_signal(signal.SIGINT)  # Ctrl-C drains the same way
            waiter.join(20)
            assert len(answers) == 1 and isinstance(answers[0], ShuttingDown), answers
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _error_of(fn) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:
        return exc
    return None


def test_stats_without_a_broker_says_how_to_start_one(tmp_path):
    url = f"ipc://{tmp_path}/nothing.sock"
    out = subprocess.run([ISOPOOL, "stats", "--url", url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "isopool serve" in out.stderr


def test_broker_loss_ends_its_processes_and_a_restarted_broker_serves_the_same_client(tmp_path, fake, own_processes):
    """SIGKILL of the broker: its zygote and workers exit by themselves (the zygote removes the
    broker's socket files), a caller blocked on a request gets BrokerUnavailable within its
    broker_timeout (never a hang), and a broker started again at the same address is used by
    the same client object."""
    proc, url = _start_serve(tmp_path, fake, heartbeat_interval=0.1)
    second = None
    try:
        with Client(url, broker_timeout=0.5) as c:
            wait_for(lambda: any(w["state"] == "ready" for w in c.stats()["workers"]), 20, "a ready worker")
            assert c.request("anthropic", "messages.create", **anthropic_args("before")).status == 200
            family = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            blocked = c.submit("anthropic", "messages.create", **anthropic_args("blocked"), **fault("silent:after=0"))
            wait_for(lambda: c.stats()["in_flight"] == 1, 10, "the request to be running")
            start = time.monotonic()
            proc.kill()
            proc.wait()
            with pytest.raises(BrokerUnavailable):
                blocked.result()
            assert time.monotonic() - start < 5  # 2 x broker_timeout, plus a probe's slack
            wait_for(lambda: not running(family), 10, "the dead broker's zygote and workers to exit")
            assert not (tmp_path / "run").exists()  # its socket files and directory: removed by its zygote

            second, _ = _start_serve(tmp_path, fake, heartbeat_interval=0.1)
            wait_for(lambda: _ready_broker(c) == second.pid, 20, "the new broker and its worker")
            assert c.request("anthropic", "messages.create", **anthropic_args("after")).status == 200
    finally:
        for p in (proc, second):
            if p is not None:
                p.kill()
                p.wait()
                p.stdout.close()


def _ready_broker(client: Client) -> int:
    """The broker's pid once it has a ready worker; 0 while it cannot be reached."""
    try:
        stats = client.stats()
    except BrokerUnavailable:
        return 0
    return stats["pid"] if any(w["state"] == "ready" for w in stats["workers"]) else 0


def test_an_owned_child_that_says_something_else_is_refused_then_killed_and_reaped(own_processes):
    """`Child`, which every owned process goes through: a child that answers with something other
    than its ready line and does not stop when its stdin closes (a plain `http.server`) gets an
    error that quotes it, then is killed once its grace is over, and reaped."""
    child = Child("http.server", "0", "--bind", "127.0.0.1", grace=0.5)
    try:
        with pytest.raises(ChildFailed, match=r"the test server failed to start \(said b'Serving HTTP on 127"):
            child.handshake(Listening, "the test server", 10.0)
    finally:
        child.stop()
    assert child.proc.returncode == -signal.SIGKILL


class _Zygote:
    """Records the spawns asked of it (a unit test of the fleet's choices)."""

    def __init__(self):
        self.specs = []

    def spawn(self, spec):
        self.specs.append(spec)
        return True


def _fleet(zygote=None, requeue=None, **profile):
    settings = load_settings(env={}, profiles={"p": {"kind": "anthropic", **profile}})
    return Fleet(settings, Stats(), Alarm(), zygote, "", -1, requeue, None)  # type: ignore[arg-type]


def _ready(fleet, slot, now):
    """A READY worker in slot `slot` of group "p", as if the fleet had spawned it."""
    fleet.generations[("p", slot)] += 1
    worker = Worker(f"p.{slot}.0".encode(), "p", slot, 0, now, group="p")
    fleet.workers[worker.ident] = worker
    fleet.on_ready(worker, Ready(worker.ident.decode(), 1, PROTOCOL_VERSION, worker.capacity, worker.token), now)
    return worker


def test_a_fresh_one_stream_worker_is_taken_after_those_that_have_served():
    """One-stream workers are taken most recently used first, but a fresh fork's first request pays its
    copy-on-write faults (~8 ms): a stall's retry goes to a worker that has served, not to the replacement
    of an earlier kill that said READY since, and a fresh one is taken only when no other is free."""
    fleet = _fleet()
    warm = _ready(fleet, 0, 1.0)
    assert fleet.has_free("p") and fleet.take("p") is warm
    warm.requests[7] = request = types.SimpleNamespace(key=7, worker=warm)
    fleet.release(warm, request, 2.0)
    fresh = _ready(fleet, 1, 3.0)
    assert [fleet.take("p") for _ in range(2)] == [warm, fresh]


def test_a_worker_killed_with_requests_is_replaced_after_the_retries_start_by_one_that_warms_up():
    """The replacement's fork and start (~10 ms of CPU) wait RETRY_FIRST while the retry starts on a free worker
    (at once if a request waits), and it runs a first call once READY: the next stall's retry is taken there
    before any fresh fork. A worker killed idle is replaced at once, cold."""
    zygote, retried = _Zygote(), []
    fleet = _fleet(zygote, lambda req, reason, now: retried.append(req), min_workers=3, spare_workers=0)
    stalled, idle, _ = (_ready(fleet, slot, 1.0) for slot in range(3))
    stalled.requests[1] = request = types.SimpleNamespace(key=1, worker=stalled, cancelled=False)
    fleet.kill(stalled, Reason.STALE, 2.0, request)
    assert retried == [request]
    fleet.reconcile(2.0, {"p": 0})
    assert zygote.specs == []
    fleet.reconcile(2.0 + RETRY_FIRST, {"p": 0})
    fleet.kill(idle, Reason.CRASH, 3.0)
    fleet.reconcile(3.0, {"p": 0})
    assert [spec.warm for spec in zygote.specs] == [True, False]
    warm, fresh = (fleet.workers[spec.ident.encode()] for spec in zygote.specs)
    for worker in (fresh, warm):
        fleet.on_ready(worker, Ready(worker.ident.decode(), 1, PROTOCOL_VERSION, 1, worker.token), 4.0)
    assert fleet.take("p") is warm

    warm.requests[1] = request
    fleet.kill(warm, Reason.STALE, 5.0, request)
    fleet.reconcile(5.0, {"p": 1})  # a request waits: no waiting for the retries
    assert [spec.warm for spec in zygote.specs] == [True, False, True]


_INTERRUPTED_SCRIPT = """
import sys, time
from broker import Pool
ask = {"model": "claude-fake", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
with Pool(profiles={"local": {"kind": "anthropic", "base_url": sys.argv[1]}}) as pool, pool.client() as client:
    client.request("local", "messages.create", **ask)
    try:
        print("ready", flush=True)  # inside: the Ctrl-C may come as soon as it is out
        time.sleep(60)
    except KeyboardInterrupt:  # as a REPL does: the session goes on
        pass
    time.sleep(0.5)  # what the broker did with the signal, it has done
    print(client.request("local", "messages.create", **ask).status, flush=True)
"""


def test_ctrl_c_at_the_terminal_reaches_the_owner_not_its_embedded_pool(tmp_path, fake, own_processes):
    """Ctrl-C signals the terminal's whole process group: the embedded pool's broker took it as its own
    and drained, so a REPL (or a script catching KeyboardInterrupt) had a dead pool after interrupting
    one call, and a CLI's pool printed a traceback when it came while the broker started."""
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), fake.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)  # as the terminal sends it
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert out == "200\n"
    assert "draining" not in err, err


def test_an_owned_child_ignores_ctrl_c_in_its_owners_process_group(fake):
    """The first fix put owned children in a process group of their own, which a terminal under `stty tostop`
    stops the first time they log (a review's finding: the pool hung). Now they stay in the owner's group,
    the terminal's foreground one, and ignore its Ctrl-C from their first line."""
    pid = fake.pid
    assert os.getpgid(pid) == os.getpgid(0)
    with open(f"/proc/{pid}/status") as status:
        ignored = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
    assert ignored & (1 << (signal.SIGINT - 1))


def test_an_owned_child_whose_owner_is_gone_says_ready_without_a_traceback(tmp_path):
    """A Ctrl-C while a pool started: its children, outliving their owner a moment, died on writing their ready
    line to the closed pipe with a BrokenPipeError traceback (and the fake provider called it a bind failure)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; from broker.processes import say_ready; time.sleep(0.5); say_ready('x')"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    child.stdout.close()  # the owner is gone
    _, err = child.communicate(timeout=30)
    assert child.returncode == 0 and err == "", err
