"""Protocol fuzzing (hypothesis): random and malformed frames at the broker's frontend and
forged worker messages at its backend, while a well-formed client keeps being served.

The broker must never crash, must answer a malformed client message with a protocol
error (the answer names request 0 when the header could not be read), must refuse a
replayed request id, and must keep every well-formed request answered correctly."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import Pool
from broker.endpoints import ipc_url
from broker.processes import running
from broker.protocol import HEADERS, PROTOCOL_VERSION, Call, Code, Codec, Heartbeat, Kind, Ref, Submit

from .conftest import TEST_SETTINGS, anthropic_args, profiles

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

MAX_BYTES = 64 * 1024
CLIENT_KINDS = {Kind.SUBMIT, Kind.CANCEL, Kind.STATS, Kind.PING}
CASES = {"frontend": 0, "backend": 0}
_ENC = msgspec.msgpack.Encoder()


@pytest.fixture(scope="module")
def fuzz_pool(fake):
    with Pool(profiles=profiles(fake.url), max_message_bytes=MAX_BYTES, **TEST_SETTINGS) as pool:
        served: list[str] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def well_formed() -> None:
            """A caller minding its own business while the fuzzing goes on."""
            with pool.client() as client:
                i = 0
                while not stop.is_set():
                    try:
                        reply = client.request("anthropic", "messages.create", **anthropic_args(f"steady {i}"))
                        served.append(reply.json()["content"][0]["text"])
                    except BaseException as exc:  # noqa: BLE001 - every failure is the finding
                        failures.append(exc)
                    i += 1

        thread = threading.Thread(target=well_formed, daemon=True)
        thread.start()
        yield pool
        stop.set()
        thread.join(30)
        assert not failures, f"well-formed requests failed during fuzzing: {failures[:3]}"
        assert len(served) >= 5, "the well-formed caller was starved"
        assert pool.running, "the broker died"
        print(f"\nfuzz cases tried: {CASES}; well-formed requests served alongside: {len(served)}")


def _socket(url: str, identity: bytes | None = None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(url)
    return sock


def _answer(sock: zmq.Socket, timeout: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), "the broker did not answer"
    return sock.recv_multipart()


frame = st.binary(max_size=64)
valid_kind = st.sampled_from(list(Kind)).map(lambda k: bytes([k]))
field = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                  st.text(max_size=20), st.binary(max_size=20), st.lists(st.integers(0, 9), max_size=3))  # fmt: skip
wrong_header = st.lists(field, min_size=0, max_size=10).map(_ENC.encode)  # array-like headers, any field types
_SUBMIT = _ENC.encode(Submit(7, "anthropic", "m", True, 1.0))
truncated = st.integers(0, len(_SUBMIT) - 1).map(lambda n: _SUBMIT[:n])
malformed = st.one_of(
    st.lists(frame, min_size=1, max_size=6),  # random frame counts and bytes
    st.tuples(st.binary(min_size=2, max_size=4), frame).map(list),  # a kind frame of the wrong length
    st.tuples(st.integers(0, 255).filter(lambda b: b not in set(Kind)).map(lambda b: bytes([b])), frame).map(list),
    st.tuples(valid_kind, wrong_header).map(list),
    st.tuples(st.just(bytes([Kind.SUBMIT])), truncated, frame).map(list),
    st.tuples(valid_kind, st.binary(min_size=4097, max_size=6000)).map(list),  # an oversized header
    st.sampled_from([k for k in Kind if k not in CLIENT_KINDS]).map(  # a worker's message from a client
        lambda k: [bytes([k]), msgspec.msgpack.encode(_sample_header(k))]
    ),
)


def _sample_header(kind: Kind) -> list:
    """A well-typed header of `kind`, as the list a msgpack array is made of."""
    return ["x" if "str" in str(typ) else 1 for typ in HEADERS[kind].__annotations__.values()]


def _well_formed_client_message(frames: list[bytes]) -> bool:
    """Whether the broker would take `frames` as a valid client message (then no protocol error is due)."""
    if len(frames) not in (2, 3) or len(frames[0]) != 1 or frames[0][0] not in {int(k) for k in CLIENT_KINDS}:
        return False
    try:
        Codec().parse(frames)
        return True
    except Exception:
        return False


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=malformed)
def test_malformed_client_messages_get_a_protocol_error(fuzz_pool, frames):
    CASES["frontend"] += 1
    sock = _socket(fuzz_pool.url)
    try:
        sock.send_multipart(frames)
        if _well_formed_client_message(frames):
            return  # e.g. a random but readable CANCEL: nothing to answer
        kind, header, _ = Codec().parse(_answer(sock))
        assert kind == Kind.ERROR and header.code == Code.PROTOCOL, (frames, kind, header)
    finally:
        sock.close(0)


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.binary(max_size=200), rid=st.integers(0, 2**32))
def test_a_submit_with_an_unreadable_payload_gets_one_typed_error(fuzz_pool, payload, rid):
    """A readable header over garbage: the worker cannot decode the call and says so; one answer."""
    CASES["frontend"] += 1
    sock = _socket(fuzz_pool.url)
    codec = Codec()
    try:
        sock.send_multipart(codec.frames(Kind.SUBMIT, Submit(rid, "anthropic", "claude-fake"), payload))
        kind, header, _ = codec.parse(_answer(sock, 20))
        assert kind == Kind.ERROR and header.rid == rid and header.code in (Code.BAD_REQUEST, Code.INTERNAL)
        assert not sock.poll(100), "a second answer to one request"
    finally:
        sock.close(0)


def test_replayed_and_unknown_request_ids(fuzz_pool):
    CASES["frontend"] += 3
    sock = _socket(fuzz_pool.url)
    codec = Codec()
    try:
        sock.send_multipart(codec.frames(Kind.CANCEL, Ref(424242)))  # cancel of nothing: ignored
        args = anthropic_args("replayed", stream=True)
        call = codec.encode(Call("messages.create", args))
        first = codec.frames(Kind.SUBMIT, Submit(9, "anthropic", "claude-fake", True, stale_timeout=20.0), call)
        sock.send_multipart(first)
        sock.send_multipart(first)  # the same id again while the first is in flight
        answers = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not answers or answers[-1][0] != Kind.RESULT):
            answers += [(kind, getattr(header, "code", None)) for kind, header, _ in codec.records(_answer(sock, 30))]
        refusals = [a for a in answers if a == (Kind.ERROR, Code.BAD_REQUEST)]
        assert len(refusals) == 1, answers  # the replay was refused, the original served
        assert answers[-1][0] == Kind.RESULT
    finally:
        sock.close(0)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    frames=st.one_of(
        st.lists(frame, min_size=1, max_size=5),
        st.tuples(valid_kind, wrong_header).map(list),
        st.tuples(st.sampled_from([Kind.EVENT, Kind.RESULT, Kind.ERROR, Kind.HEAD, Kind.PROGRESS]),
                  st.integers(0, 50)).map(lambda t: [bytes([t[0]]), _ENC.encode([t[1], 1, 1])
                                                     if t[0] == Kind.EVENT else _ENC.encode([t[1], "x"])
                                                     if t[0] == Kind.ERROR else _ENC.encode([t[1]]), b"{}"]),
        st.builds(lambda name, v, token: [bytes([Kind.READY]), _ENC.encode([name, 1, v, 1, token])],
                  st.text(max_size=12), st.sampled_from([99, PROTOCOL_VERSION]), st.text(max_size=32)),
        st.builds(lambda name, token: [bytes([Kind.HEARTBEAT]), _ENC.encode([name, token])],
                  st.text(max_size=12), st.text(max_size=32)),
    ),
    identity=st.sampled_from([None, b"anthropic.0.0", b"anthropic.1.0", b"openai.0.0", b"nobody"]),
)  # fmt: skip
def test_forged_worker_messages_are_ignored(fuzz_pool, frames, identity):
    """Anyone on the machine who can reach the backend socket (only the owner can) still
    cannot steer requests: messages from unknown or impersonated identities are dropped."""
    CASES["backend"] += 1
    run_dir = fuzz_pool.settings.run_dir
    sock = _socket(ipc_url(run_dir, "backend"), identity)
    try:
        sock.send_multipart(frames)
    finally:
        sock.close(0)
    assert fuzz_pool.running


def test_forged_heartbeats_do_not_keep_a_hung_worker_alive(fuzz_pool):
    """Heartbeats carry the secret each worker got at spawn: a process that names a hung
    worker in forged heartbeats cannot stop the broker from replacing it."""
    CASES["backend"] += 1
    with fuzz_pool.client() as client:
        victim = next(w for w in client.stats()["workers"] if w["profile"] == "openai" and w["pid"])
        killed_before = client.stats()["kills"].get("heartbeat_lost", 0)
        sock = _socket(ipc_url(fuzz_pool.settings.run_dir, "backend"), b"impostor")
        forged = Codec().frames(Kind.HEARTBEAT, Heartbeat(victim["ident"], "0" * 32))
        os.kill(victim["pid"], signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10
            while running({victim["pid"]}):  # (pid_exists then Process() raced the worker's reaping)
                assert time.monotonic() < deadline, "forged heartbeats kept a hung worker alive"
                sock.send_multipart(forged)
                time.sleep(0.02)
        finally:
            sock.close(0)
            if running({victim["pid"]}):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim["pid"], signal.SIGKILL)
        assert client.stats()["kills"]["heartbeat_lost"] == killed_before + 1


def test_an_oversized_message_is_dropped_and_the_pool_keeps_serving(fuzz_pool):
    CASES["frontend"] += 1
    sock = _socket(fuzz_pool.url)
    try:
        sock.send_multipart([bytes([Kind.SUBMIT]), _ENC.encode(Submit(1, "anthropic")), b"x" * (MAX_BYTES + 70_000)])
        assert not sock.poll(500)  # ZeroMQ drops the connection of a peer over MAXMSGSIZE
    finally:
        sock.close(0)
    with fuzz_pool.client() as client:
        assert client.request("anthropic", "messages.create", **anthropic_args("after the flood")).status == 200
