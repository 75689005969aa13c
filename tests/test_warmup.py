"""The zygote's warm-up runs a worker's real call path in memory: it must work on every SDK generation CI
runs (the oldest pinned ones too), or the warm-up silently does nothing."""

from __future__ import annotations

import subprocess
import sys
import threading

import psutil
import pytest

from broker import Pool
from worker import warmup

from .conftest import anthropic_args, fault, wait_for


@pytest.mark.parametrize("family", ["anthropic", "openai"])
def test_warm_up_runs_the_worker_call_path(family, monkeypatch):
    seen, ends = [], []

    class Recording(warmup._Discard):
        async def events(self, batch):
            seen.extend(name for name, _ in batch)

        async def result(self, response):
            ends.append(response)

    monkeypatch.setattr(warmup, "_Discard", Recording)
    monkeypatch.setattr(warmup, "_WARMED", set())
    threads = set(threading.enumerate())
    warmup.warm_up((family,), None)
    assert seen, f"the {family} warm-up call produced no events"
    assert ends[-1] is not None and ends[-1].body, "the plain (assembled) call produced no body"
    assert set(threading.enumerate()) <= threads, "the warm-up left a thread behind (the zygote forks after it)"
    calls = len(ends)
    warmup.warm_up((family,), None)  # the zygote preloads kind after kind: a family already warm is not run again
    assert len(ends) == calls


def test_preload_builds_the_message_codecs_type_information_before_any_fork():
    """A worker's first step is its Codec: built cold, msgspec works out every message type (~3.5 ms of a
    forked worker's start, most of it copy-on-write faults). The zygote builds it once, so a worker's is cheap."""
    code = (
        "import gc, sys\n"
        "from broker.protocol import Codec\n"
        "from worker.main import preload\n"
        "preload(())\n"
        "gc.disable()\n"
        "before = sys.getallocatedblocks()\n"
        "Codec()\n"
        "print(sys.getallocatedblocks() - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert int(done.stdout.split()[-1]) < 50, "a worker's Codec still builds msgspec's type information"


def test_the_replacement_of_a_worker_killed_with_a_stall_runs_a_first_call_while_idle(fake, own_processes):
    """The next stall's retry is taken on it: it holds the page copies of a first call (a worker that served
    once holds them too), which a cold spare of the same pool does not."""
    profile = {"kind": "anthropic", "base_url": fake.url, "min_workers": 3, "spare_workers": 0}
    with Pool(profiles={"anthropic": profile}) as pool, pool.client() as client:
        wait_for(lambda: len(_ready(client)) == 3, what="three workers")
        before = _ready(client)
        call = client.submit("anthropic", "messages.create", stream=True, first_event_timeout=0.3,
                             **anthropic_args("warm me"), **fault("stall-first:interval=0.05"))  # fmt: skip
        assert list(call), "the retry answered"
        workers = wait_for(lambda: len(_ready(client)) == 3 and _ready(client), what="the replacement")
        (replacement,) = set(workers) - set(before)
        (cold,) = {ident for ident, w in workers.items() if not w["served"]} - {replacement}
        wait_for(lambda: _uss(workers[replacement]) - _uss(workers[cold]) > 2 << 20, 10, "the replacement's first call")


def _ready(client):
    return {w["ident"]: w for w in client.stats()["workers"] if w["state"] == "ready"}


def _uss(worker):
    return psutil.Process(worker["pid"]).memory_full_info().uss
