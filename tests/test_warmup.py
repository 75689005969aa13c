"""The zygote's warm-up runs a worker's real call path in memory: it must work on every SDK generation CI
runs (the oldest pinned ones too), or the warm-up silently does nothing."""

from __future__ import annotations

import threading

import pytest

from worker import warmup


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
