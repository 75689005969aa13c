"""The broker survives any client (issue 15, F18): each test is one way a careless or hostile
caller broke it, and proves that the pool now refuses it with a typed error while everyone
else is served. The gateway, the shim, batch output and the machine have files of their own
(`test_adversarial_*.py`)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import zmq

from broker import (
    AttemptsExhausted,
    BadRequest,
    BrokerUnavailable,
    Client,
    ClientClosed,
    Pool,
    PoolSaturated,
    StreamStalled,
)
from broker.config import load_settings
from broker.protocol import Call, Codec, Kind, Ref, Submit
from broker.server.broker import Broker
from broker.wire.curve import keygen, secure_client

from .conftest import (
    TEST_SETTINGS,
    anthropic_args,
    fault,
    profile_pids,
    profiles,
    settled,
    stop_reading_after_a_long_stream,
    wait_for,
)

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

MIB = 2**20


def one_worker(fake, **extra):
    profile = profiles(fake.url)["anthropic"] | {"min_workers": 1, "max_workers": 1, "spare_workers": 0}
    return {"anthropic": profile | extra}


# Two pools, each shared by the tests that name it and set as they all need (each has a setting that a test of
# the other must not run under): each starts once, not once per test. A test gets its pool in the state a new
# one starts in (`settled`), and counts what it causes from the counts it finds.


@pytest.fixture(scope="module")
def _single(fake):
    settings = dict(TEST_SETTINGS, request_min_timeout=2.0, client_buffer=50, max_message_bytes=8 * MIB,
                    queue_bytes_limit=40 * MIB, client_queue_bytes_limit=24 * MIB)  # fmt: skip
    with Pool(profiles=one_worker(fake), **settings) as pool:
        yield pool


@pytest.fixture(scope="module")
def _mixed(fake):
    settings = dict(TEST_SETTINGS, request_max_attempts=3, max_message_bytes=MIB, queue_bytes_limit=16 * MIB)
    with Pool(profiles=one_worker(fake) | {"multi": one_worker(fake, concurrency=8)["anthropic"]}, **settings) as pool:
        yield pool


@pytest.fixture
def single(_single):
    """One worker that carries one stream (profile `anthropic`)."""
    return settled(_single)


@pytest.fixture
def mixed(_mixed):
    """One worker that carries one stream (profile `anthropic`) and one that carries eight (`multi`)."""
    return settled(_mixed)


def grown(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """What each of a shared pool's counters gained since `before`."""
    return {key: n - before.get(key, 0) for key, n in after.items() if n != before.get(key, 0)}


def test_closing_a_client_ends_its_calls_in_flight_with_client_closed(pool):
    client = pool.client()
    calls = [
        client.submit("anthropic", "messages.create", **anthropic_args(f"closing {i}"), **fault("slow-first:delay=2"))
        for i in range(2)
    ]
    closer = threading.Thread(target=client.close)
    closer.start()
    for call in calls:
        with pytest.raises(ClientClosed, match="closed while this call was in flight"):
            call.result()
    closer.join(10)
    assert not closer.is_alive()


def _unseeded_auto_ids(count: int = 8) -> set[int]:
    """The first routing ids a ROUTER of a process whose C library was never seeded would make:
    libzmq starts its counter at `generate_random()`, two `rand()` calls."""
    out = subprocess.run(
        [sys.executable, "-c", "import ctypes; r = ctypes.CDLL(None).rand; print([r() for _ in range(40)])"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    draws = eval(out)  # noqa: S307 - a list of ints printed by our own child
    return {(draws[i + 1] << 31 | draws[i]) & 0xFFFFFFFF for i in range(0, 2 * count, 2)}


def _curve_settings(tmp_path, monkeypatch) -> dict:
    """A tcp:// frontend with CURVE, and this process's clients holding an allowed key."""
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    keygen(str(keys), "broker")
    keygen(str(keys), "alice")
    (allowed / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    monkeypatch.setenv("ISOPOOL_CLIENT_KEY", str(keys / "alice.key_secret"))
    monkeypatch.setenv("ISOPOOL_BROKER_KEY", str(keys / "broker.key"))
    return dict(frontend="tcp://127.0.0.1:*", curve_server_key=str(keys / "broker.key_secret"),
                curve_clients_dir=str(allowed))  # fmt: skip


@pytest.mark.parametrize("transport", ["ipc", "curve-tcp"])
def test_a_client_choosing_routing_ids_cannot_crash_the_broker(fake, own_processes, transport, tmp_path, monkeypatch):
    """libzmq aborts the process when a ROUTER's generated id (a zero byte and a 32-bit counter
    from an unseeded `rand()`) is already taken by a peer that chose it. A hostile client
    that claims the ids an unseeded broker would hand out next must not take it down. A pool of
    its own: the ids claimed are those after a start, whatever other tests connected before."""
    frontend = _curve_settings(tmp_path, monkeypatch) if transport == "curve-tcp" else {}
    with Pool(profiles=one_worker(fake), **TEST_SETTINGS, **frontend) as pool:
        hostile = []
        for start in _unseeded_auto_ids():
            for n in range(48):
                sock = zmq.Context.instance().socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.ROUTING_ID, b"\x00" + ((start + n) & 0xFFFFFFFF).to_bytes(4, "big"))
                secure_client(sock, pool.url)
                sock.connect(pool.url)
                sock.send_multipart(Codec().frames(Kind.PING, Ref(1)))
                hostile.append(sock)
        try:
            wait_for(lambda: all(s.poll(0) for s in hostile), 30, "the hostile connections to be answered")
            for i in range(3):  # ordinary clients: each gets a generated id
                with pool.client() as client:
                    assert client.request("anthropic", "messages.create", **anthropic_args(f"after {i}")).status == 200
            assert pool.running, "the broker died"
        finally:
            for sock in hostile:
                sock.close(0)


def test_the_broker_sleeps_while_requests_wait_in_its_queue(single, own_processes):
    """Queued requests wait for a worker to free up, an event the loop is woken for; they must
    not make the broker poll with a zero timeout (it burned a whole core while anything was queued)."""
    with single.client() as client:
        busy = client.submit("anthropic", "messages.create", **anthropic_args("busy"), **fault("slow-first:delay=4"))
        waiting = [client.submit("anthropic", "messages.create", **anthropic_args(f"w {i}")) for i in range(2)]
        wait_for(lambda: client.stats()["queued"]["anthropic"] == 2, 10, "two requests queued")
        broker = psutil.Process(client.stats()["pid"])
        before = broker.cpu_times()
        time.sleep(2.0)  # a measurement window, not a synchronisation
        after = broker.cpu_times()
        used = (after.user + after.system) - (before.user + before.system)
        assert client.stats()["queued"]["anthropic"] == 2, "the window must be spent with requests queued"
        assert used < 0.5, f"the broker used {used:.2f}s of CPU in 2s with two requests queued"
        assert busy.result().status == 200 and all(w.result().status == 200 for w in waiting)


@pytest.mark.parametrize(
    "limit",
    [
        {"stale_timeout": float("nan")},
        {"deadline": float("inf")},
        {"first_event_timeout": -1.0},
        {"max_attempts": 0},
    ],  # fmt: skip
)
def test_a_request_limit_that_is_not_a_positive_number_is_refused(client, fake, limit):
    served = fake.stats()["completed"]
    with pytest.raises(BadRequest, match=next(iter(limit))):
        client.request("anthropic", "messages.create", **anthropic_args("bad limit"), **limit)
    assert fake.stats()["completed"] == served


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -5.0])
def test_an_sdk_timeout_that_is_not_a_positive_number_is_refused_at_once(client, fake, timeout):
    """nan reached the worker's SDK client, which failed the call as a connection error, retried as one."""
    served = fake.stats()["completed"]
    started = time.monotonic()
    with pytest.raises(BadRequest, match="timeout must be a positive, finite number of seconds"):
        client.request("anthropic", "messages.create", **anthropic_args("bad timeout"), timeout=timeout)
    assert time.monotonic() - started < 1.0 and fake.stats()["completed"] == served  # not tried, not retried


def test_a_tiny_stale_timeout_is_raised_to_the_operators_floor(single, own_processes):
    """0.02 s between events would kill a healthy stream that sends one every 0.1 s, over and over.
    The pool's floor, request_min_timeout, is 2 s: a margin for a loaded machine."""
    with single.client() as client:
        kills = client.stats()["kills"]
        call = client.submit("anthropic", "messages.create", stream=True, stale_timeout=0.02,
                             **anthropic_args("tiny stale"), **fault("drip:gap=0.1"))  # fmt: skip
        assert len(list(call)) > 3 and call.result().status == 200
        assert not grown(client.stats()["kills"], kills)


def test_a_huge_max_attempts_is_capped_by_the_operator(mixed, own_processes):
    """The pool's request_max_attempts is 3."""
    with mixed.client() as client:
        # a stall after the first events (a silent provider would be retried only once)
        stalls = fault("stall-ping:after=1,interval=0.1,times=1000")
        call = client.submit("anthropic", "messages.create", stale_timeout=0.3, max_attempts=10**9,
                             **anthropic_args("never"), **stalls)  # fmt: skip
        with pytest.raises(AttemptsExhausted) as caught:
            call.result()
        assert caught.value.info.attempts == 3


def test_a_callers_short_limit_never_kills_a_neighbours_healthy_stream(mixed, own_processes):
    """On a worker that carries several streams, a request whose own stale_timeout (tighter than
    the pool's) passes is aborted alone; the worker and the other caller's stream go on."""
    with mixed.client() as client:
        before = client.stats()
        healthy = client.submit("multi", "messages.create", stream=True,
                                **anthropic_args("healthy neighbour"), **fault("drip:gap=0.15"))  # fmt: skip
        events = iter(healthy)
        next(events)
        pid = profile_pids(client, "multi")
        culprit = client.submit("multi", "messages.create", stream=True, stale_timeout=0.5,
                                **anthropic_args("culprit"), **fault("silent:after=2"))  # fmt: skip
        with pytest.raises(StreamStalled):
            list(culprit)
        assert len(list(events)) > 3 and healthy.result().status == 200
        stats = client.stats()
        kills = grown(stats["kills"], before["kills"])
        assert grown(stats["stalls"], before["stalls"]) == {"stale_timeout": 1} and not kills, kills
        assert profile_pids(client, "multi") == pid


def test_request_bytes_held_by_the_broker_have_a_global_and_a_per_connection_budget(single, own_processes):
    """Thirty queued 15 MiB requests took the broker from 32 to 692 MiB. Now what requests hold
    is bounded: past a connection's share or the pool's budget they are refused, typed. The
    pool's max_message_bytes is 8 MiB, queue_bytes_limit 40 MiB, client_queue_bytes_limit 24 MiB."""
    with single.client() as first, single.client() as second:
        broker = psutil.Process(single.pid)
        rss_before = broker.memory_info().rss
        refused = first.stats()["rejected"].get("saturated", 0)
        busy = first.submit("anthropic", "messages.create", **anthropic_args("busy"), **fault("slow-first:delay=30"))
        big = "x" * (6 * MIB)
        mine = [first.submit("anthropic", "messages.create", **anthropic_args(big + str(i))) for i in range(5)]
        # the second connection sends only once the broker has taken in the first's: two connections' messages
        # interleave in any order, and which budget refuses depends on it
        wait_for(lambda: first.stats()["rejected"].get("saturated", 0) == refused + 2, 20,
                 "the first connection's refusals")  # fmt: skip
        theirs = [second.submit("anthropic", "messages.create", **anthropic_args(big + str(i))) for i in range(5)]
        wait_for(lambda: first.stats()["rejected"].get("saturated", 0) == refused + 4, 20, "four refusals")
        for calls, accepted, setting in ((mine, 3, "client_queue_bytes_limit"), (theirs, 3, "queue_bytes_limit")):
            for call in calls[accepted:]:
                with pytest.raises(PoolSaturated, match=setting):
                    call.result()
        assert first.stats()["queued"]["anthropic"] == 6
        assert broker.memory_info().rss - rss_before < 120 * MIB
        for call in [busy, *mine[:3], *theirs[:3]]:  # the next test shares the pool
            call.cancel()
        wait_for(lambda: first.stats()["in_flight"] == 0, 20, "the cancelled calls to end")


def test_a_connection_that_stopped_reading_gets_nothing_but_its_answers_queued(single, own_processes):
    """Answers wait (parked) for a caller that stopped reading; STATS replies (each a copy of the
    broker's snapshot) and refusals of what it goes on sending must not pile up behind them. The
    pool's client_buffer is 50."""
    with single.client() as other:
        codec = Codec()
        before = other.stats()

        def new(counts: str) -> dict[str, int]:
            return grown(other.stats()[counts], before[counts])

        sock = stop_reading_after_a_long_stream(single.url)
        try:
            wait_for(lambda: new("requests").get("cancelled") == 1, 30, "the unread stream to be cut off")
            call = codec.encode(Call("messages.create", anthropic_args("more")))
            for rid in range(2, 202):
                sock.send_multipart(codec.frames(Kind.STATS, Ref(rid)))
                sock.send_multipart(codec.frames(Kind.SUBMIT, Submit(rid, "anthropic", "claude-fake"), call))
                sock.send_multipart([b"\xff", b"garbage"])
            wait_for(lambda: new("rejected").get("saturated", 0) == 400, 10, "STATS and SUBMITs refused")
            wait_for(lambda: new("rejected").get("protocol", 0) == 200, 10, "the garbage refused")
            ends = []
            while sock.poll(2000):
                for kind, header, _ in codec.records(sock.recv_multipart()):
                    if kind in (Kind.RESULT, Kind.ERROR):
                        ends.append((kind, header.rid))
            assert ends == [(Kind.ERROR, 1)], ends[:5]
        finally:
            sock.close(0)


def _ends_within(call, seconds: float):
    """The call's end (result or exception) if it comes within `seconds`, else AssertionError."""
    outcome: list = []
    waiter = threading.Thread(target=lambda: outcome.append(_outcome(call)), daemon=True)
    waiter.start()
    waiter.join(seconds)
    assert outcome, f"the call did not end within {seconds}s"
    return outcome[0]


def _outcome(call):
    try:
        return call.result()
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test inspects
        return exc


def test_an_oversized_request_is_refused_by_the_client_and_its_other_calls_go_on(mixed, own_processes):
    """Sent, a request over max_message_bytes (the pool's: 1 MiB) made ZeroMQ drop the connection
    silently, and the client's other calls in flight never ended."""
    with mixed.client(broker_timeout=1) as client:
        running = client.submit("multi", "messages.create", **anthropic_args("running"),
                                **fault("slow-first:delay=1"))  # fmt: skip
        with pytest.raises(BadRequest, match="max_message_bytes"):
            client.submit("multi", "messages.create", **anthropic_args("x" * (2 * 2**20)))
        assert _ends_within(running, 20).status == 200


def test_a_dropped_connection_ends_its_calls_in_flight_and_sends_none_of_them_later(mixed, fake, own_processes):
    """A client that believes the broker takes more than it does (the pool's max_message_bytes is
    1 MiB): the broker's ZeroMQ drops the connection. Its calls in flight end with BrokerUnavailable
    at once, and none of them is sent on the next connection to run unanswered (requests queued
    behind the big one used to be)."""
    with mixed.client() as other:
        with Client(mixed.url, broker_timeout=30, max_message_bytes=2**24) as client:
            assert client.request("multi", "messages.create", **anthropic_args("warm")).status == 200
            served = fake.stats()["completed"]
            calls = [client.submit("multi", "messages.create", **anthropic_args("x" * (2 * 2**20)))]
            calls += [client.submit("multi", "messages.create", **anthropic_args(f"small {i}")) for i in range(100)]
            outcomes = [_ends_within(call, 20) for call in calls]
            assert isinstance(outcomes[0], BrokerUnavailable) and "dropped" in str(outcomes[0])
            answered = sum(not isinstance(o, Exception) for o in outcomes)
            assert all(isinstance(o, BrokerUnavailable) for o in outcomes if isinstance(o, Exception))
            assert client.request("multi", "messages.create", **anthropic_args("after")).status == 200
            wait_for(lambda: other.stats()["in_flight"] == 0, 10, "nothing left in flight")
            assert fake.stats()["completed"] - served == answered + 1, "a call reported unanswered was run"


def test_a_signal_after_the_broker_closed_prints_nothing(fake, capfd):
    """The broker's signal handlers write to a wake-up pipe; once it was closed, a late Ctrl-C
    printed "Exception ignored when trying to write to the signal wakeup fd ... EBADF"."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    broker = Broker(load_settings(profiles=one_worker(fake), **TEST_SETTINGS))
    try:
        broker.start()
        broker.install_signal_handlers()
    finally:
        broker.close()
    try:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # the first may be consumed as the pending wake-up
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert "wakeup fd" not in capfd.readouterr().err
