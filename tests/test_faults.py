"""One end-to-end test (or more) per fault F1-F12 of DESIGN.md: real processes, real sockets,
the real SDKs inside real workers, and the fake provider over loopback HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import zmq

from broker import (
    AttemptsExhausted,
    BadRequest,
    BrokerUnavailable,
    Cancelled,
    Pool,
    ProviderConnectionError,
    ProviderStatusError,
    ProviderStreamError,
    StreamStalled,
    WorkerLost,
)
from broker.protocol import Code, Codec, Kind, Ref, Submit

from .conftest import (
    TEST_SETTINGS,
    anthropic_args,
    assert_dead,
    fault,
    fault_kills,
    openai_args,
    profile_pids,
    profiles,
    sdk_has,
    wait_for,
    worker_pids,
)

STREAMING = {
    "anthropic": ("messages.create", anthropic_args),
    "openai": ("chat.completions.create", openai_args),
}


def kills(client, reason: str) -> int:
    return client.stats()["kills"].get(reason, 0)


def request_pair(client, profile: str, prompt: str, spec: str, **limits):
    """The faulted request and its unfaulted twin (same body, so the same answer)."""
    method, make = STREAMING[profile]
    faulted = client.request(profile, method, **limits, **make(prompt), **fault(spec))
    clean = client.request(profile, method, **make(prompt))
    return faulted, clean


# F1 -------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["anthropic", "openai"])
def test_f1_no_first_event_kills_worker_and_retry_succeeds(client, profile):
    before = worker_pids(client)
    killed_before = kills(client, "first_event_timeout")
    start = time.monotonic()
    faulted, clean = request_pair(client, profile, f"f1 {profile}", "stall-first:interval=0.1", first_event_timeout=0.5)
    assert time.monotonic() - start >= 0.5
    assert faulted.status == 200 and faulted.body == clean.body
    assert kills(client, "first_event_timeout") == killed_before + 1
    gone = set(before.values()) - set(worker_pids(client).values())
    assert len(gone) == 1
    assert_dead(gone)


# F2, F3, F4 -----------------------------------------------------------------------

STALLS = ["stall-ping:after=5,interval=0.1", "stall-comment:after=5,interval=0.1", "silent:after=5"]


@pytest.mark.parametrize("profile", ["anthropic", "openai"])
@pytest.mark.parametrize("spec", STALLS, ids=["F2-ping", "F3-comment", "F4-silent"])
def test_stall_of_unseen_call_is_killed_and_retried(client, profile, spec):
    before = worker_pids(client)
    stale_before = kills(client, "stale_timeout")
    faulted, clean = request_pair(client, profile, f"unseen {profile} {spec}", spec, stale_timeout=0.4)
    assert faulted.body == clean.body
    assert kills(client, "stale_timeout") == stale_before + 1
    assert_dead(set(before.values()) - set(worker_pids(client).values()))


@pytest.mark.parametrize("profile", ["anthropic", "openai"])
@pytest.mark.parametrize("spec", STALLS, ids=["F2-ping", "F3-comment", "F4-silent"])
def test_stall_of_seen_stream_gives_typed_error(client, profile, spec):
    method, make = STREAMING[profile]
    call = client.submit(
        profile, method, stale_timeout=0.4, stream=True, **make(f"seen {profile} {spec}"), **fault(spec)
    )
    events = []
    start = time.monotonic()
    with pytest.raises(StreamStalled) as caught:
        for event in call:
            events.append(event)
    assert time.monotonic() - start >= 0.4
    # Anthropic's `ping` among the first five is not a real event, so it was not delivered
    assert len(events) == (4 if profile == "anthropic" else 5)
    assert caught.value.delivered == len(events)
    assert caught.value.request_id == call.request_id
    assert "stale_timeout" in str(caught.value)


# F5 -------------------------------------------------------------------------------


def test_f5_drip_faster_than_stale_timeout_is_not_killed(client):
    stale_before = kills(client, "stale_timeout")
    args = anthropic_args("f5 healthy drip")
    call = client.submit(
        "anthropic", "messages.create", stale_timeout=1.0, stream=True, **args, **fault("drip:gap=0.05")
    )
    events = list(call)
    clean = list(client.submit("anthropic", "messages.create", stream=True, **args))
    assert events == clean
    assert kills(client, "stale_timeout") == stale_before


def test_f5_drip_slower_than_stale_timeout_is_stale(client):
    stale_before = kills(client, "stale_timeout")
    faulted, clean = request_pair(client, "anthropic", "f5 slow drip", "drip:gap=0.8", stale_timeout=0.3)
    assert faulted.body == clean.body
    assert kills(client, "stale_timeout") == stale_before + 1


def test_f5_long_healthy_first_token_wait_is_not_killed(client):
    before = fault_kills(client)
    faulted, clean = request_pair(
        client, "openai", "f5 slow first", "slow-first:delay=1.5", first_event_timeout=4.0, stale_timeout=0.5
    )
    assert faulted.body == clean.body
    assert fault_kills(client) == before


# F6 -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["reset:after=5", "close:after=5"])
def test_f6_connection_lost_mid_stream_seen_gives_clear_error(client, spec):
    args = anthropic_args(f"f6 seen {spec}")
    events = []
    with pytest.raises(ProviderConnectionError) as caught:
        for event in client.submit("anthropic", "messages.create", stream=True, **args, **fault(spec)):
            events.append(event)
    assert len(events) == 4 and caught.value.delivered == 4
    wait_for(lambda: client.stats()["in_flight"] == 0, 5, "no request left in flight")
    assert all(not w["requests"] for w in client.stats()["workers"])  # no stuck slot


@pytest.mark.parametrize("spec", ["reset:after=5", "close:after=5"])
def test_f6_connection_lost_unseen_is_retried(client, spec):
    retries_before = client.stats()["retries"]
    faulted, clean = request_pair(client, "openai", f"f6 unseen {spec}", spec)
    assert faulted.body == clean.body
    assert client.stats()["retries"] == retries_before + 1


# F7 -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["http-429:retry_after=0", "http-500"])
def test_f7_transient_provider_errors_follow_sdk_retries(client, spec):
    before = fault_kills(client)
    faulted, clean = request_pair(client, "anthropic", f"f7 {spec}", spec)
    assert faulted.body == clean.body
    assert fault_kills(client) == before  # provider errors are not stalls


@pytest.mark.parametrize("profile", ["anthropic", "openai"])
def test_f7_overloaded_beyond_sdk_retries_raises_status_error(client, profile):
    method, make = STREAMING[profile]
    with pytest.raises(ProviderStatusError) as caught:
        client.request(profile, method, **make(f"f7 529 {profile}"), **fault("http-529:times=10"))
    assert caught.value.status == 529
    assert "overloaded_error" in str(caught.value.body)
    assert caught.value.info.error_type in ("OverloadedError", "InternalServerError", "APIStatusError")


@pytest.mark.parametrize("profile", ["anthropic", "openai"])
def test_f7_mid_stream_error_event(client, profile):
    method, make = STREAMING[profile]
    events = []
    with pytest.raises(ProviderStreamError):
        for event in client.submit(
            profile, method, stream=True, **make(f"f7 event {profile}"), **fault("error-event:after=4")
        ):
            events.append(event)
    assert events and ("error" in (events[-1].name, *events[-1].json()))
    # unstreamed, nothing reached the caller: an overloaded error is retried, a refusal never
    call = client.submit(profile, method, **make(f"f7 event plain {profile}"), **fault("error-event:after=4"))
    assert call.result().status == 200 and call.served.attempts == 2  # type: ignore[union-attr]
    with pytest.raises(ProviderStreamError, match="invalid_request_error"):
        client.request(profile, method, **make(f"f7 event refused {profile}"),
                       **fault("error-event:after=4,error=invalid_request_error"))  # fmt: skip


# F8, F9 ---------------------------------------------------------------------------


def _busy_worker_pid(client) -> int:
    busy = wait_for(lambda: [w for w in client.stats()["workers"] if w["requests"]], 10, "a busy worker")
    return busy[0]["pid"]


def test_f8_hung_interpreter_loses_heartbeat_and_request_is_retried(client):
    """SIGSTOP freezes the whole interpreter, heartbeat thread included: what a worker stuck
    holding the GIL looks like from outside. The stream itself has generous limits."""
    killed_before = kills(client, "heartbeat_lost")
    args = anthropic_args("f8 hung")
    call = client.submit("anthropic", "messages.create", **args, **fault("slow-first:delay=2"))
    pid = _busy_worker_pid(client)
    os.kill(pid, signal.SIGSTOP)
    result = call.result()
    assert result.body == client.request("anthropic", "messages.create", **args).body
    assert kills(client, "heartbeat_lost") == killed_before + 1
    assert_dead({pid})


# Loaded by every process of the pool below (it is first on their PYTHONPATH): SIGUSR2 makes a
# worker hang in C code that holds the GIL, which a SIGSTOP only imitates.
SPIN_ON_SIGUSR2 = textwrap.dedent(
    """
    import re
    import signal


    def spin_holding_the_gil(*_):
        re.match(r"(a*)*b", "a" * 64)  # backtracks for ever, inside the regex engine


    signal.signal(signal.SIGUSR2, spin_holding_the_gil)
    """
)


def test_f8_a_hung_worker_has_its_stacks_logged_then_is_killed_and_its_request_retried(
    fake, tmp_path, monkeypatch, capfd, own_processes
):
    (tmp_path / "sitecustomize.py").write_text(SPIN_ON_SIGUSR2)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    anthropic_only = {"anthropic": profiles(fake.url)["anthropic"]}
    with Pool(profiles=anthropic_only, **TEST_SETTINGS) as pool, pool.client() as client:
        args = anthropic_args("f8 spin")
        call = client.submit("anthropic", "messages.create", **args, **fault("slow-first:delay=2"))
        pid = _busy_worker_pid(client)
        os.kill(pid, signal.SIGUSR2)
        assert call.result().body == client.request("anthropic", "messages.create", **args).body
        assert kills(client, "heartbeat_lost") == 1
        assert_dead({pid})
    log = capfd.readouterr().err
    assert "heartbeat_lost; its Python stacks:" in log
    assert "in spin_holding_the_gil" in log, log[-3000:]


def test_f9_crashed_worker_is_detected_and_request_retried(client):
    crashed_before = kills(client, "crashed")
    args = openai_args("f9 crash")
    call = client.submit("openai", "chat.completions.create", **args, **fault("slow-first:delay=2"))
    pid = _busy_worker_pid(client)
    os.kill(pid, signal.SIGKILL)
    assert call.result().body == client.request("openai", "chat.completions.create", **args).body
    assert kills(client, "crashed") == crashed_before + 1
    wait_for(lambda: len(client.stats()["workers"]) >= 3, 10, "the crashed worker to be replaced")


def test_f9_worker_over_memory_limit_is_killed_and_retried(fake, own_processes):
    # A fresh worker's USS is a few MB; a request carrying ~40 MB of prompt pushes it over 30 MB.
    big = "x" * (40 * 1024 * 1024)
    settings = dict(TEST_SETTINGS, max_memory_per_worker_mb=30, max_attempts=2, max_message_bytes=64 * 1024 * 1024)
    with Pool(profiles=profiles(fake.url, min_workers=1), **settings) as pool, pool.client() as client:
        args = anthropic_args(big)
        with pytest.raises(AttemptsExhausted) as caught:
            client.request("anthropic", "messages.create", **args, **fault("slow-first:delay=30,times=5"))
        assert "memory_limit" in str(caught.value)
        assert client.stats()["kills"]["memory_limit"] == 2
        # a normal request still works on the respawned workers
        assert client.request("anthropic", "messages.create", **anthropic_args("small")).status == 200


# F10 ------------------------------------------------------------------------------


def test_f10_broker_killed_workers_exit_and_callers_get_clear_error(fake, own_processes):
    with Pool(profiles=profiles(fake.url), **TEST_SETTINGS) as pool:
        family = {p.pid for p in psutil.Process(pool.pid).children(recursive=True)}
        assert len(family) >= 4  # zygote and workers
        with pool.client(broker_timeout=0.3) as client:
            call = client.submit(
                "anthropic", "messages.create", **anthropic_args("f10"), **fault("slow-first:delay=30")
            )
            _busy_worker_pid(client)
            os.kill(pool.pid, signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                call.result()
            assert time.monotonic() - start < 5
        wait_for(lambda: not any(psutil.pid_exists(p) for p in family), 10, "zygote and workers to exit")


# F11 ------------------------------------------------------------------------------

_VANISHING_CALLER = textwrap.dedent(
    """
    import os, sys
    from broker import Client
    client = Client(sys.argv[1])
    call = client.submit("anthropic", "messages.create", model="claude-fake", max_tokens=64, stream=True,
                         messages=[{"role": "user", "content": "f11 vanish"}],
                         extra_headers={"x-isopool-fault": "drip:gap=0.2"})
    it = iter(call)
    next(it); next(it)
    print("reading", flush=True)
    os._exit(0)
    """
)


def test_f11_caller_vanishing_mid_stream_cancels_and_frees_slot(client, pool, fake):
    cancelled_before = client.stats()["requests"].get("cancelled", 0)
    out = subprocess.run([sys.executable, "-c", _VANISHING_CALLER, pool.url], capture_output=True, timeout=60)
    assert b"reading" in out.stdout, out.stderr.decode()
    wait_for(lambda: client.stats()["requests"].get("cancelled", 0) == cancelled_before + 1, 10, "the cancel")
    wait_for(lambda: client.stats()["in_flight"] == 0, 10, "no request in flight")
    wait_for(lambda: all(not w["requests"] for w in client.stats()["workers"]), 10, "free slots")
    wait_for(lambda: fake.stats()["active"] == 0, 10, "the upstream stream to be closed")


def test_a_cancel_that_reaches_a_worker_with_its_run_is_confirmed_and_kills_nothing(client):
    """A worker that reads a request and its cancel in one go (it was busy, or the caller went away just
    as the request was assigned) confirms the cancel: the task cancelled before its first step never ran
    its body, so no confirmation went out and the worker, with its neighbours, was killed 5 s later."""
    killed_before, cancelled_before = fault_kills(client), client.stats()["requests"].get("cancelled", 0)
    retired_before = kills(client, "scale_down")
    workers = profile_pids(client, "anthropic")
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)  # each reads nothing until both messages wait for it
    try:
        call = client.submit("anthropic", "messages.create", **anthropic_args("f11 run and cancel"))
        _busy_worker_pid(client)
        call.cancel()
        wait_for(
            lambda: client.stats()["requests"].get("cancelled", 0) > cancelled_before,
            10,
            "the broker to take the cancel",
        )
        time.sleep(0.1)  # the ABORT on its way behind the RUN
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    with pytest.raises(Cancelled):
        call.result()
    wait_for(lambda: all(not w["requests"] for w in client.stats()["workers"]), 3, "the worker to confirm")
    assert fault_kills(client) == killed_before
    gone = workers - set(worker_pids(client).values())
    assert len(gone) <= kills(client, "scale_down") - retired_before  # none but those retired idle


def test_f11_caller_abandoning_iteration_cancels(client, fake):
    args = anthropic_args("f11 abandon")
    call = client.submit("anthropic", "messages.create", stream=True, **args, **fault("drip:gap=0.2"))
    for _ in call:
        break
    wait_for(lambda: client.stats()["in_flight"] == 0, 10, "the cancel to end the request")
    wait_for(lambda: all(not w["requests"] for w in client.stats()["workers"]), 10, "free slots")
    wait_for(lambda: fake.stats()["active"] == 0, 10, "the upstream stream to be closed")


# F12 ------------------------------------------------------------------------------


def _raw(pool, frames: list[bytes]) -> tuple[int, str]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool.url)
    try:
        sock.send_multipart(frames)
        assert sock.poll(10_000), "the broker did not answer"
        kind, header, payload = Codec().parse(sock.recv_multipart())
        assert kind == Kind.ERROR
        return header.rid, Codec().error(payload).code
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.parametrize(
    "frames, code",
    [
        ([b"\x63", b"\x91\x01"], Code.PROTOCOL),  # unknown kind
        ([bytes([Kind.SUBMIT]), b"\xc1garbage"], Code.PROTOCOL),  # undecodable header
        ([bytes([Kind.SUBMIT])], Code.PROTOCOL),  # too few frames
        ([bytes([Kind.SUBMIT]), b"", b"", b"", b""], Code.PROTOCOL),  # too many frames
        ([bytes([Kind.SUBMIT]), b"\xda" + b"\xff\xff" + b"x" * 70000], Code.PROTOCOL),  # oversized header
        ([bytes([Kind.EVENT]), Codec().encode(Ref(3)), b"{}"], Code.PROTOCOL),  # a worker's message
    ],
    ids=["unknown-kind", "bad-header", "few-frames", "many-frames", "huge-header", "wrong-direction"],
)
def test_f12_malformed_messages_get_error_and_broker_keeps_serving(pool, client, frames, code):
    assert _raw(pool, frames)[1] == code
    count_tokens = "messages.count_tokens" if sdk_has("messages.count_tokens") else "beta.messages.count_tokens"
    counted = client.request("anthropic", count_tokens, model="claude-fake", messages=anthropic_args("hi")["messages"])
    assert counted.json() == {"input_tokens": 4}


def test_f12_unknown_profile_and_oversized_payload_are_refused(pool, client):
    codec = Codec()
    rid, code = _raw(pool, codec.frames(Kind.SUBMIT, Submit(7, "nope"), b"\x80"))
    assert (rid, code) == (7, Code.BAD_REQUEST)
    huge = b"\x00" * (pool.settings.max_message_bytes + 1)
    assert _raw(pool, codec.frames(Kind.SUBMIT, Submit(8, "anthropic"), huge)) == (8, Code.BAD_REQUEST)


@pytest.mark.parametrize(
    "method", ["messages._post", "_client.post", "messages.with_raw_response", "messages", "nope.create", "api_key.x"]
)
def test_f12_non_public_methods_are_refused(client, method):
    with pytest.raises(BadRequest):
        client.request("anthropic", method, **anthropic_args("f12 method"))


def test_f12_per_request_credentials_are_refused(client, fake):
    served = sum(fake.stats()["served"].values())
    with pytest.raises(BadRequest, match="(?i)x-api-key"):
        client.request("anthropic", "messages.create", **anthropic_args("steal"), extra_headers={"X-Api-Key": "other"})
    assert sum(fake.stats()["served"].values()) == served  # no connection was attempted


def test_a_stall_on_a_multi_stream_worker_is_the_only_stall_counted(fake, own_processes):
    """Killing a worker that carries several streams ends them all; only the stalled one is
    a stall. A neighbour that had delivered output gets WorkerLost saying why; an unseen
    neighbour is retried on the replacement."""
    one = {"anthropic": profiles(fake.url)["anthropic"] | {"min_workers": 1, "max_workers": 1, "concurrency": 4}}
    settings = dict(TEST_SETTINGS, stale_timeout=1.0)  # the pool's own limit (a caller's own would spare neighbours)
    with Pool(profiles=one, **settings) as pool, pool.client() as client:
        stalled = client.submit("anthropic", "messages.create", stream=True,
                                **anthropic_args("stalls"), **fault("silent:after=3"))  # fmt: skip
        seen = client.submit("anthropic", "messages.create", stream=True,
                             **anthropic_args("drips"), **fault("drip:gap=0.3,times=1"))  # fmt: skip
        unseen = client.submit("anthropic", "messages.create", **anthropic_args("slow"),
                               **fault("slow-first:delay=3,times=1"))  # fmt: skip
        events = iter(seen)
        next(events)  # the neighbour has delivered output
        with pytest.raises(StreamStalled):
            list(stalled)
        with pytest.raises(WorkerLost, match="killed_with_a_stalled_neighbour"):
            list(events)
        assert unseen.result().status == 200  # retried on the replacement worker
        stats = client.stats()
        assert stats["stalls"] == {"stale_timeout": 1} and stats["kills"]["stale_timeout"] == 1
