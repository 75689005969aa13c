"""Shared fixtures: one fake provider and one pool for the session, plus leak checks.

Every process a test starts must be gone when it ends; the session checks that no
child process and no socket file is left behind.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import zmq
from packaging.version import Version

os.environ["ANTHROPIC_API_KEY"] = "sk-ant-test-isopool-0000"
os.environ["OPENAI_API_KEY"] = "sk-test-isopool-0000"

from broker import Pool  # noqa: E402
from broker.fake_provider import FAULT_HEADER, LATENCY_HEADER, FakeProviderProcess  # noqa: E402
from broker.protocol import Call, Codec, Kind, Submit  # noqa: E402

# Small heartbeats; generous limits that a test lowers per request. A worker is declared hung after 3 s
# without a heartbeat: two cores shared by several suites starve a healthy worker for over a second (at load
# 18, 0.1 s x 10 killed one waiting on a silent provider: a heartbeat kill and a retry that test did not expect).
TEST_SETTINGS: dict[str, Any] = dict(
    heartbeat_interval=0.1,
    heartbeat_misses=30,
    first_event_timeout=20.0,
    stale_timeout=20.0,
    deadline=120.0,
    startup_timeout=60.0,
    http_retry_backoff=0.05,  # a provider's 429/5xx retried soon: the tests count attempts, not wait them out
    log_level="WARNING",
)


def profiles(url: str, **extra: Any) -> dict[str, dict[str, Any]]:
    return {
        "anthropic": {"kind": "anthropic", "base_url": url, "min_workers": 2, "spare_workers": 1, **extra},
        "openai": {"kind": "openai", "base_url": url + "/v1", "min_workers": 1, "spare_workers": 1, **extra},
    }


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `condition` until it is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def settled(pool: Any) -> Any:
    """A shared pool as a new one starts: nothing in flight, its workers ready (the test before may have
    killed one)."""
    with pool.client() as client:
        wait_for(lambda: client.stats()["in_flight"] == 0, 20, "the calls of the test before to end")
    pool.wait_ready(20)
    return pool


def anthropic_args(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "claude-fake", "max_tokens": 64, "messages": [{"role": "user", "content": prompt}], **extra}


def openai_args(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-fake", "messages": [{"role": "user", "content": prompt}], **extra}


# The releases that have each SDK API the oldest supported SDKs (tests/oldest-sdks.txt) lack, or only they
# have: (sdk, first, first without), read from the released wheels. CI runs the SDK-facing modules a second
# time on those SDKs (.ci/oldest-sdks).
RELEASES = {
    "messages.count_tokens": ("anthropic", "0.41.0", None),  # before, only `beta.messages.count_tokens`
    "messages.batches": ("anthropic", "0.41.0", None),  # before, only `beta.messages.batches`
    "beta.prompt_caching": ("anthropic", None, "0.41.0"),  # prompt caching's beta resource, gone at its GA
    "OverloadedError": ("anthropic", "0.47.0", None),  # before, a 529 is an InternalServerError
    "thinking": ("anthropic", "0.47.0", None),  # the `thinking=` parameter; before, `extra_body` carries it
    "_request_id": ("openai", "1.46.0", None),  # a result's request id; before, its `x-request-id` header only
    "responses": ("openai", "1.66.0", None),  # the Responses API
    "chat.completions.parse": ("openai", "1.92.0", None),  # before, `beta.chat.completions.parse`
}


def sdk_has(api: str) -> bool:
    """Whether the installed SDK has `api` (a key of RELEASES)."""
    sdk, first, gone = RELEASES[api]
    have = Version(importlib.metadata.version(sdk))
    return (first is None or have >= Version(first)) and (gone is None or have < Version(gone))


def needs_sdk(api: str) -> pytest.MarkDecorator:
    """Skip a test of `api` (a key of RELEASES) where the installed SDK lacks it, saying which releases have it."""
    sdk, first, gone = RELEASES[api]
    which = " and ".join(bound for bound in (first and f">= {first}", gone and f"< {gone}") if bound)
    reason = f"{api} needs {sdk} {which}; installed: {importlib.metadata.version(sdk)}"
    return pytest.mark.skipif(not sdk_has(api), reason=reason)


def http_chunks(raw: bytes) -> list[bytes]:
    """The chunks of a complete chunked HTTP/1.1 answer (head and all) as the server wrote them, one per write."""
    rest = raw.split(b"\r\n\r\n", 1)[1]
    chunks = []
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            return chunks
        chunks.append(rest[: int(size, 16)])
        rest = rest[int(size, 16) + 2 :]


def fault(spec: str) -> dict[str, Any]:
    return {"extra_headers": {FAULT_HEADER: spec}}


def worker_pids(client: Any) -> dict[str, int]:
    return {w["ident"]: w["pid"] for w in client.stats()["workers"] if w["pid"]}


def profile_pids(client: Any, profile: str) -> set[int]:
    """The pids of one profile's live workers (a shared pool's other profiles left out)."""
    return {w["pid"] for w in client.stats()["workers"] if w["profile"] == profile and w["pid"]}


def fault_kills(client: Any) -> dict[str, int]:
    """The kills so far but for idle workers retired (`scale_down`): the session's pool retires one whenever it
    has been idle long enough, in the middle of any test (a fresh-ci run counted one during F5's slow first token)."""
    return {reason: n for reason, n in client.stats()["kills"].items() if reason != "scale_down"}


def assert_dead(pids: set[int]) -> None:
    wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 10, f"pids {pids} to be gone")


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


if _worker := os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker its own temp dir (its pools' sockets, its children's files): a worker's
    # leftovers check must not see the other worker's live pools.
    os.environ["TMPDIR"] = os.path.join(tempfile.gettempdir(), f"isopool-tests-{_worker}")
    os.makedirs(os.environ["TMPDIR"], exist_ok=True)
    tempfile.tempdir = None


@pytest.fixture(scope="session", autouse=True)
def no_leftovers():
    sockets_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "isopool-*")))
    yield
    wait_for(lambda: not descendants(), 15, "every child process to exit at the end of the session")
    left = set(glob.glob(os.path.join(tempfile.gettempdir(), "isopool-*"))) - sockets_before
    assert not left, f"socket directories left behind: {left}"


@pytest.fixture(scope="session")
def fake():
    with FakeProviderProcess() as provider:
        yield provider


@pytest.fixture(scope="session")
def pool(fake):
    with Pool(profiles=profiles(fake.url), **TEST_SETTINGS) as p:
        yield p


@pytest.fixture
def client(pool):
    with pool.client() as c:
        yield c


def started_by_test(before: set[int]) -> set[int]:
    """Descendants that are new and not the children of processes the session already had
    (a session pool may respawn a worker during any test)."""
    me = os.getpid()
    found = set()
    for proc in psutil.Process(me).children(recursive=True):
        if proc.pid in before:
            continue
        try:
            ancestors = {p.pid for p in proc.parents()}
        except psutil.NoSuchProcess:
            continue
        if not (ancestors & before):
            found.add(proc.pid)
    return found


@pytest.fixture
def own_processes():
    """Fail a test that leaves behind any process it started."""
    before = descendants()
    yield
    wait_for(lambda: not started_by_test(before), 15, "the test's own processes to exit")


def stop_reading_after_a_long_stream(url: str) -> zmq.Socket:
    """A raw caller that submits a 100,000-event stream (request id 1) and reads nothing: the
    broker's buffer for it fills, and it is cut off (parked) once `client_buffer` messages wait."""
    codec = Codec()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 10)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(url)
    args = anthropic_args("a long one", max_tokens=100_000, stream=True)
    args["extra_headers"] = {LATENCY_HEADER: "tokens=100000"}
    call = codec.encode(Call("messages.create", args))
    sock.send_multipart(codec.frames(Kind.SUBMIT, Submit(1, "anthropic", "claude-fake", True), call))
    return sock
