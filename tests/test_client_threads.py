"""A synchronous `Client` shared by threads: each gets its own answers, and closing it (from another
thread, or from a signal handler on a waiting thread) ends every wait with ClientClosed. Real pool,
real threads."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import signal
import threading
import time

import pytest
import zmq

from broker import Cancelled, ClientClosed
from broker.client.client import Client

from .conftest import anthropic_args, fault, wait_for


@contextlib.contextmanager
def _alarm_in(seconds: float, handler):
    """`handler` runs on the main thread (signals go there) `seconds` from now, unless the block ended."""
    previous = signal.signal(signal.SIGALRM, handler)
    armed, every = signal.setitimer(signal.ITIMER_REAL, seconds)  # pytest-timeout's, if it runs one
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if armed:  # put it back, less the time spent here, so that a hang still fails the test
            signal.setitimer(signal.ITIMER_REAL, max(armed - (time.monotonic() - started), 0.001), every)


def _text(result) -> str:
    return result.json()["content"][0]["text"]


def _answers(client, *prompts: str) -> dict[str, str]:
    """Each prompt's answer, asked one at a time (the fake answers a body the same every time)."""
    return {p: _text(client.request("anthropic", "messages.create", **anthropic_args(p))) for p in prompts}


def _in_thread(name: str, work, out: dict) -> threading.Thread:
    def run() -> None:
        try:
            out[name] = work()
        except BaseException as exc:  # noqa: BLE001 - what the thread ended with is what the test checks
            out[name] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def test_many_threads_sharing_a_client_each_get_their_own_answers(client):
    want = _answers(client, *(f"t{n} c{i}" for n in range(8) for i in range(3)))
    out: dict = {}

    def calls(n: int):
        def run() -> list[str]:
            asks = [client.submit("anthropic", "messages.create", **anthropic_args(f"t{n} c{i}")) for i in range(3)]
            return [_text(call.result()) for call in reversed(asks)]

        return run

    threads = [_in_thread(f"t{n}", calls(n), out) for n in range(8)]
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert out == {f"t{n}": [want[f"t{n} c{i}"] for i in (2, 1, 0)] for n in range(8)}


def test_closing_a_client_while_threads_wait_ends_each_wait_with_client_closed(pool):
    client = pool.client()
    calls = [
        client.submit("anthropic", "messages.create", **anthropic_args(f"w{i}"), **fault("slow-first:delay=5"))
        for i in range(3)
    ]
    out: dict = {}
    threads = [_in_thread(f"w{i}", call.result, out) for i, call in enumerate(calls)]
    time.sleep(0.5)  # one reads, two wait on their own calls
    started = time.monotonic()
    client.close()
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - started < 5, "closing waited for the calls instead of ending them"
    assert all(isinstance(out[f"w{i}"], ClientClosed) for i in range(3)), out
    with pytest.raises(ClientClosed):
        calls[0].result()


def test_a_signal_handler_closing_the_client_while_its_thread_waits_ends_the_call(pool):
    """The handler runs on the waiting thread itself: closing may not wait for that thread."""
    client = pool.client()
    call = client.submit("anthropic", "messages.create", **anthropic_args("closed by a handler"),
                         **fault("slow-first:delay=5"))  # fmt: skip
    started = time.monotonic()
    with _alarm_in(0.5, lambda *_: client.close()), pytest.raises(ClientClosed):
        call.result()
    assert time.monotonic() - started < 4


def test_a_call_submitted_while_another_thread_closes_the_client_gets_client_closed(pool):
    """Never ZeroMQ's own error from a socket closed under it: each submit is sent, or refused as closed."""
    for _ in range(5):
        client = pool.client()
        errors: list[BaseException] = []

        def submit_until_closed(client=client, errors=errors) -> None:
            for n in range(10_000):
                try:
                    client.submit("anthropic", "messages.count_tokens", **anthropic_args(f"s{n}"))
                except ClientClosed:
                    return
                except BaseException as exc:  # noqa: BLE001 - anything else is the defect
                    errors.append(exc)
                    return

        submitter = threading.Thread(target=submit_until_closed)
        submitter.start()
        time.sleep(0.05)
        client.close()
        submitter.join(30)
        assert not errors, errors


def test_threads_closing_one_client_at_once_each_return(pool):
    """However the closes interleave, each returns, none raises, and the client is closed."""
    for round_ in range(20):
        client = pool.client()
        call = client.submit("anthropic", "messages.create", **anthropic_args(f"c{round_}"),
                             **fault("slow-first:delay=5"))  # fmt: skip
        start = threading.Barrier(4)
        out: dict = {}

        def close(client=client, start=start) -> None:
            start.wait(5)
            client.close()

        threads = [_in_thread(f"close{n}", close, out) for n in range(4)]
        for thread in threads:
            thread.join(10)
        assert not any(thread.is_alive() for thread in threads), f"round {round_}: a close() never returned"
        assert out == {f"close{n}": None for n in range(4)}, f"round {round_}: {out}"
        with pytest.raises(ClientClosed):
            call.result()


def test_a_signal_handler_closing_the_client_during_its_threads_own_close_returns(pool):
    """The handler's close runs inside the thread's own, at any point of it: both return."""
    for delay in (0.0001, 0.0005, 0.001, 0.002, 0.005):
        client = pool.client()
        with _alarm_in(delay, lambda *_, client=client: client.close()):
            client.close()
            time.sleep(0.02)  # the alarm has gone off, during the close or after it
        with pytest.raises(ClientClosed):
            client.submit("anthropic", "messages.count_tokens", **anthropic_args("after"))


def test_stats_asked_while_another_thread_closes_the_client_gets_client_closed(pool):
    """Never the event loop's RuntimeError, nor a wait for a loop that has stopped."""
    for _ in range(10):
        client = pool.client()
        out: dict = {}

        def stats_until_closed(client=client):
            while True:
                client.stats()

        asker = _in_thread("stats", stats_until_closed, out)
        time.sleep(0.05)
        client.close()
        asker.join(10)
        assert not asker.is_alive(), "stats() waited for a client that was closed"
        assert isinstance(out["stats"], ClientClosed), out


def _in_child(work) -> str:
    """What `work` ends with in a forked child: "ok", or the repr of what it raised (or "hung")."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            signal.signal(signal.SIGALRM, lambda *_: (os.write(writer, b"hung"), os._exit(0)))
            signal.alarm(10)
            work()
            os.write(writer, b"ok")
        except BaseException as exc:  # noqa: BLE001 - the report is what it raised
            os.write(writer, repr(exc).encode()[:500])
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = pipe.read().decode()
    os.waitpid(child, 0)
    return report


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: POSIX only")
def test_a_client_used_in_a_forked_child_says_so_instead_of_hanging(pool):
    """Its loop thread stayed in the parent: a call, a wait for the parent's call, stats or close in the
    child end at once (ClientClosed, saying to make a client there; close does nothing), and the parent's
    client goes on working."""
    client = pool.client()
    ask = anthropic_args("before fork")
    slow = client.submit("anthropic", "messages.create", **ask, **fault("slow-first:delay=1"))
    for work in (lambda: client.request("anthropic", "messages.create", **ask), slow.result,
                 lambda: list(slow), client.stats, client.ping):  # fmt: skip
        report = _in_child(work)
        assert report.startswith("ClientClosed(") and "fork" in report, report
    assert _in_child(client.close) == "ok"
    assert _text(slow.result())
    assert _text(client.request("anthropic", "messages.create", **ask))
    client.close()


def test_an_async_client_goes_on_in_a_new_event_loop_once_its_first_has_ended(pool):
    """`asyncio.run` twice with one AsyncClient (a script's two phases, a test per loop): the second loop's
    calls are answered (they went unread: the socket was still watched by the closed loop), a call the
    first loop left behind ends there with ClientClosed, and closing from a third loop works."""
    client = pool.async_client()
    ask = anthropic_args("two loops")
    left: list = []

    async def first() -> str:
        left.append(await client.submit("anthropic", "messages.create", **ask, **fault("slow-first:delay=2")))
        return _text(await client.request("anthropic", "messages.create", **ask))

    async def second() -> str:
        return _text(await asyncio.wait_for(client.request("anthropic", "messages.create", **ask), 10))

    want = asyncio.run(first())
    assert asyncio.run(second()) == want
    assert asyncio.run(second()) == want
    asyncio.run(client.close())
    with pytest.raises(ClientClosed):
        asyncio.run(left[0].result())


def test_an_async_client_used_from_a_second_running_loop_says_so(pool):
    """One client, two loops running at once (two threads): the second is refused with a clear error, the
    first goes on."""
    client = pool.async_client()
    ask = anthropic_args("loop owner")
    ready, done = threading.Event(), threading.Event()
    out: dict = {}

    async def owner() -> str:
        await client.request("anthropic", "messages.create", **ask)
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.01)
        answer = _text(await client.request("anthropic", "messages.create", **ask))
        await client.close()
        return answer

    thread = _in_thread("owner", lambda: asyncio.run(owner()), out)
    assert ready.wait(10)
    with pytest.raises(ClientClosed, match="another event loop"):
        asyncio.run(client.request("anthropic", "messages.create", **ask))
    done.set()
    thread.join(10)
    assert isinstance(out["owner"], str) and out["owner"], out


def test_two_loops_taking_up_a_client_at_once_one_is_answered_the_other_refused(pool, monkeypatch):
    """Two threads' loops make their first call on one AsyncClient at the same moment, once its first loop has
    ended: one takes the socket over and is answered, the other is refused. Both took it over before: two
    loops watched one socket, each reading answers the other awaited."""
    client = pool.async_client()
    ask = anthropic_args("two at once")
    want = _text(asyncio.run(client.request("anthropic", "messages.create", **ask)))
    leave = client._leave_loop

    def slow_leave() -> None:
        time.sleep(0.3)  # both threads inside the hand-over at once
        leave()

    monkeypatch.setattr(client, "_leave_loop", slow_leave)
    start, done = threading.Barrier(2), threading.Event()

    async def use() -> str:
        start.wait(10)
        answer = _text(await asyncio.wait_for(client.request("anthropic", "messages.create", **ask), 10))
        await asyncio.to_thread(done.wait, 20)  # this loop runs on until the other has had its answer
        return answer

    out: dict = {}
    threads = [_in_thread(name, lambda: asyncio.run(use()), out) for name in ("a", "b")]
    deadline = time.monotonic() + 15
    while not out and time.monotonic() < deadline:  # the refused loop ends at once; with no refusal, neither does
        time.sleep(0.05)
    done.set()
    for thread in threads:
        thread.join(20)
    refused = [v for v in out.values() if isinstance(v, ClientClosed)]
    assert len(refused) == 1 and "another event loop" in str(refused[0]), out
    assert [v for v in out.values() if not isinstance(v, ClientClosed)] == [want], out
    asyncio.run(client.close())


def test_a_closed_async_client_used_from_a_new_loop_says_it_is_closed(pool):
    """Closed in one `asyncio.run`, called in the next: ClientClosed, not ZeroMQ's "Socket operation on
    non-socket" from taking over a closed socket."""
    client = pool.async_client()
    asyncio.run(client.request("anthropic", "messages.create", **anthropic_args("closed then")))
    asyncio.run(client.close())
    for _ in range(2):
        with pytest.raises(ClientClosed, match="this client is closed"):
            asyncio.run(client.request("anthropic", "messages.create", **anthropic_args("closed then")))


def test_a_calls_end_taken_by_a_wait_a_ctrl_c_cut_short_still_ends_the_next_wait(client):
    """CPython checks for a Ctrl-C right after a C call returns, so a wait cut short there has already taken
    the call's end from its queue (done here by hand, as that wait would have). A caller that caught the
    KeyboardInterrupt and asked for the result again waited forever; it gets the result."""
    ask = anthropic_args("cut short")
    want = _text(client.request("anthropic", "messages.create", **ask))
    call = client.submit("anthropic", "messages.create", **ask)
    pending = call._state.sink.queue
    wait_for(lambda: call._state.rid not in client._async._calls and not pending.empty(), what="the end queued")
    while not pending.empty():
        pending.get_nowait()  # what the interrupted wait took
    out: dict = {}
    _in_thread("again", call.result, out).join(10)
    assert "again" in out, "the second wait for the result never returned"
    assert _text(out["again"]) == want


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "isopool-client" and t.is_alive()]


def test_a_signal_handler_closing_the_client_while_its_thread_sends_ends_the_call(pool):
    """The handler's thread may hold the socket's lock, halfway through a message: the close ends the calls
    there and returns; the socket closes once the send is done (it hung: the close waited for the loop's
    thread, which waited for that lock)."""
    rng = random.Random(7)
    for round_ in range(30):
        client = pool.client()
        with _alarm_in(rng.uniform(0.0005, 0.02), lambda *_, client=client: client.close()):
            with pytest.raises(ClientClosed):
                for n in range(100_000):
                    client.submit("anthropic", "messages.count_tokens", **anthropic_args(f"s{n}"))
        assert client._ended.wait(5), f"round {round_}: the client's thread was left running"


def test_a_close_interrupted_by_ctrl_c_is_finished_by_the_next(pool):
    """A KeyboardInterrupt anywhere in close(), then close() again (a `with` block's exit, a retry): closed,
    its thread gone and its call ended (the second close returned at once, leaving it half-open)."""
    rng = random.Random(11)
    interrupted = 0

    def interrupt(*_):
        raise KeyboardInterrupt

    for _ in range(60):
        client = pool.client()
        call = client.submit("anthropic", "messages.create", **anthropic_args("k"), **fault("slow-first:delay=5"))
        try:
            with _alarm_in(rng.uniform(0.00002, 0.002), interrupt):
                client.close()
                time.sleep(0.005)  # the alarm goes off here if not during the close
        except KeyboardInterrupt:
            interrupted += 1
        client.close()
        assert client._ended.is_set() and client._loop.is_closed()
        with pytest.raises((ClientClosed, Cancelled)):  # Cancelled: the close was cut short after its cancels
            call.result()
    assert interrupted >= 5, "too few closes were interrupted for the test to say anything"


def test_clients_left_unclosed_stop_once_they_are_garbage(pool):
    """No thread and no sockets left behind by a client nobody closed (each kept its thread and 7 fds)."""
    before = len(_client_threads())
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        client = pool.client()
        client.stats()
        del client
    gc.collect()
    deadline = time.monotonic() + 10
    while len(_client_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_client_threads()) <= before
    assert len(os.listdir("/proc/self/fd")) <= fds + 10  # each leaked 7


def test_a_client_that_cannot_be_made_leaves_no_thread():
    before = len(_client_threads())
    for _ in range(3):
        with pytest.raises(zmq.ZMQError):
            Client("not-a-url://x")
    assert len(_client_threads()) == before


def test_a_close_from_the_clients_own_thread_ends_it_without_a_deadlock(pool):
    """As a logging handler run by that thread could: the calls end, the thread stops, and a close or a call
    from another thread then returns."""
    client = pool.client()
    call = client.submit("anthropic", "messages.create", **anthropic_args("own"), **fault("slow-first:delay=5"))
    client._loop.call_soon_threadsafe(client.close)
    with pytest.raises(ClientClosed):
        call.result()
    assert client._ended.wait(5)
    out: dict = {}
    for thread in (_in_thread("close", client.close, out), _in_thread("stats", client.stats, out)):
        thread.join(5)
        assert not thread.is_alive()
    assert out["close"] is None and isinstance(out["stats"], ClientClosed), out


@pytest.mark.parametrize("frame", [0, 1, 2])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_ctrl_c_between_two_frames_of_a_submit_loses_no_other_call(pool, monkeypatch, when, frame):
    """A Ctrl-C's handler can run between two frames of a message (they go out one by one), before or after
    any of them: the message is ended all the same, so the next call, from any thread, is not glued onto it
    and lost (it never ended), and the interrupted call leaves nothing in the client's table."""
    from broker.wire import zmqio

    send, sends = zmqio._send, [0]

    def interrupted(sock, data, flags):
        n, sends[0] = sends[0], sends[0] + 1
        if (n, when) == (frame, "before"):
            raise KeyboardInterrupt
        send(sock, data, flags)
        if (n, when) == (frame, "after"):
            raise KeyboardInterrupt

    client = pool.client()
    monkeypatch.setattr(zmqio, "_send", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.submit("anthropic", "messages.create", **anthropic_args("interrupted"))
    sends[0] = -100  # no more interrupts
    out: dict = {}
    ask = anthropic_args("b")
    asker = _in_thread("next", lambda: _text(client.request("anthropic", "messages.create", **ask)), out)
    asker.join(10)
    assert not asker.is_alive(), "the next call never ended"
    assert out["next"] == _answers(client, "b")["b"]
    assert not client._async._calls
    client.close()


def test_a_submit_interrupted_after_its_last_frame_is_cancelled_at_the_broker(pool, monkeypatch):
    """A Ctrl-C's handler run once the whole request has gone: the broker has it, and without a cancel would
    run it (and the provider bill it) for a caller that never gets the answer."""
    from broker.wire import zmqio

    send, sends = zmqio._send, [0]

    def interrupted(sock, data, flags):
        send(sock, data, flags)
        sends[0] += 1
        if sends[0] == 3:  # a submit's last frame
            raise KeyboardInterrupt

    client = pool.client()
    counts = client.stats()["requests"]
    monkeypatch.setattr(zmqio, "_send", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.submit("anthropic", "messages.create", **anthropic_args("sent whole"), **fault("slow-first:delay=3"))
    monkeypatch.setattr(zmqio, "_send", send)
    cancelled = counts.get("cancelled", 0) + 1
    wait_for(lambda: client.stats()["requests"].get("cancelled", 0) == cancelled, 2.5, "the call's cancel")
    assert client.stats()["requests"]["accepted"] == counts["accepted"] + 1  # it had reached the broker
    assert not client._async._calls
    client.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: POSIX only")
def test_an_async_client_used_in_a_forked_child_says_so_and_the_parents_goes_on(pool):
    """The child's loop must not touch the socket: its selector shares the parent's epoll (unwatching there
    unwatched the parent's socket, whose answers then went unread), and the child spun in libzmq."""
    client = pool.async_client()
    loop = asyncio.new_event_loop()  # kept open, not running: the child may not take the client over
    ask = anthropic_args("async fork")
    want = _text(loop.run_until_complete(client.request("anthropic", "messages.create", **ask)))
    for work in (lambda: asyncio.run(client.request("anthropic", "messages.create", **ask)),
                 lambda: asyncio.run(client.ping())):  # fmt: skip
        report = _in_child(work)
        assert report.startswith("ClientClosed(") and "fork" in report, report
    assert _in_child(lambda: asyncio.run(client.close())) == "ok"
    for _ in range(3):
        answer = loop.run_until_complete(asyncio.wait_for(client.request("anthropic", "messages.create", **ask), 10))
        assert _text(answer) == want
    loop.run_until_complete(client.close())
    loop.close()
