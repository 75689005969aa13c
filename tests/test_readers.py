"""A synchronous `Client` has no thread of its own: the threads that wait for answers take turns
reading its socket (broker/client/readers.py). Real pool, real threads: none may be left waiting
for an answer that came, whoever read it, and a reader that stops (its own answer came, Ctrl-C)
hands the role on."""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import pytest

from broker import ClientClosed

from .conftest import anthropic_args, fault


class _Alarm(Exception):
    pass


@contextlib.contextmanager
def _alarm_in(seconds: float, handler):
    """`handler` runs on the main thread (signals go there) `seconds` from now, unless the block ended."""
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _text(result) -> str:
    return result.json()["content"][0]["text"]


def _answers(client, *prompts: str) -> dict[str, str]:
    """Each prompt's answer, asked one at a time (the fake answers a body the same every time)."""
    return {p: _text(client.request("anthropic", "messages.create", **anthropic_args(p))) for p in prompts}


def _readers_of(client) -> set[str]:
    """Names of the threads that read the client's socket (its `_read` wrapped to record them)."""
    names: set[str] = set()
    read = client._read

    def recorded() -> None:
        names.add(threading.current_thread().name)
        read()

    client._readers._read = recorded
    return names


def _in_thread(name: str, work, out: dict) -> threading.Thread:
    def run() -> None:
        try:
            out[name] = work()
        except BaseException as exc:  # noqa: BLE001 - what the thread ended with is what the test checks
            out[name] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def test_a_reader_whose_answer_comes_first_hands_the_reading_to_a_thread_still_waiting(client, pool):
    want = _answers(client, "slow", "fast", "slower")
    readers = _readers_of(client)
    slow = client.submit("anthropic", "messages.create", **anthropic_args("slow"), **fault("slow-first:delay=1"))
    out: dict = {}
    first = _in_thread("first", slow.result, out)  # waits first: reads for everyone
    time.sleep(0.3)
    fast = client.submit("anthropic", "messages.create", **anthropic_args("fast"))
    slower = client.submit("anthropic", "messages.create", **anthropic_args("slower"), **fault("slow-first:delay=2.5"))
    threads = [first, _in_thread("fast", fast.result, out), _in_thread("slower", slower.result, out)]
    for thread in threads:
        thread.join(20)
    assert not any(thread.is_alive() for thread in threads), f"left waiting: {set(out) ^ {'first', 'fast', 'slower'}}"
    assert {name: _text(result) for name, result in out.items()} == {
        "first": want["slow"], "fast": want["fast"], "slower": want["slower"]
    }  # fmt: skip
    assert {"first", "slower"} <= readers, readers  # the role went on when `first` had its answer


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


def test_a_reader_stopped_by_an_exception_hands_the_reading_on(client):
    """Ctrl-C (here SIGALRM raising) in the thread reading for others: the others still get their answers."""
    want = _answers(client, "theirs")
    readers = _readers_of(client)
    mine = client.submit("anthropic", "messages.create", **anthropic_args("mine"), **fault("slow-first:delay=5"))
    theirs = client.submit("anthropic", "messages.create", **anthropic_args("theirs"), **fault("slow-first:delay=1.5"))
    out: dict = {}

    def wait_then_read() -> object:
        time.sleep(0.3)  # the main thread reads first
        return theirs.result()

    other = _in_thread("other", wait_then_read, out)

    def alarm(*_):
        raise _Alarm

    with _alarm_in(0.7, alarm), pytest.raises(_Alarm):
        mine.result()
    mine.cancel()
    other.join(20)
    assert not other.is_alive(), "the waiting thread was left without a reader"
    assert _text(out["other"]) == want["theirs"]
    assert {"MainThread", "other"} <= readers, readers


def test_one_call_read_from_two_threads_at_once_is_refused_and_the_first_still_gets_it(client):
    want = _answers(client, "one reader")
    call = client.submit("anthropic", "messages.create", **anthropic_args("one reader"), **fault("slow-first:delay=1"))
    out: dict = {}
    first = _in_thread("first", call.result, out)
    time.sleep(0.3)
    with pytest.raises(RuntimeError, match="another thread is already reading this call"):
        call.result()
    first.join(20)
    assert _text(out["first"]) == want["one reader"]


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


def test_a_signal_handler_closing_the_client_while_its_thread_reads_ends_the_call(pool):
    """The handler runs on the reading thread itself: closing may not wait for that reader to stop."""
    client = pool.client()
    call = client.submit("anthropic", "messages.create", **anthropic_args("closed by a handler"),
                         **fault("slow-first:delay=5"))  # fmt: skip
    started = time.monotonic()
    with _alarm_in(0.5, lambda *_: client.close()), pytest.raises(ClientClosed):
        call.result()
    assert time.monotonic() - started < 4
