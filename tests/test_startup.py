"""Start-up (issue 19): a pool's zygote imports one SDK after the other, and forks the workers of
each as soon as its own SDK is in, so the first profile's workers do not wait for the second SDK."""

from __future__ import annotations

import os
import time
from pathlib import Path

from broker import Pool

from .conftest import TEST_SETTINGS, anthropic_args, openai_args, profiles

# A stand-in `openai` package, first on the pool's path: it sleeps, notes when it is done, then
# replaces itself in sys.modules with the real SDK (so the zygote holds the real one afterwards).
SLOW_OPENAI = """
import importlib, os, sys, time
time.sleep({delay})
with open({done!r}, "w") as f:
    f.write(repr(time.time()))
sys.path.remove({root!r})
del sys.modules["openai"]
sys.modules["openai"] = importlib.import_module("openai")
"""


def slow_openai(root: Path, delay: float) -> Path:
    """A directory whose `openai` takes `delay` seconds to import; returns the file it writes when done."""
    done = root / "openai-imported"
    (root / "openai").mkdir(parents=True)
    (root / "openai" / "__init__.py").write_text(SLOW_OPENAI.format(delay=delay, done=str(done), root=str(root)))
    return done


def test_the_first_sdks_workers_answer_while_the_second_is_still_importing(fake, tmp_path, monkeypatch, own_processes):
    done = slow_openai(tmp_path / "path", delay=8.0)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "path"), os.environ.get("PYTHONPATH", "")]))
    with Pool(profiles=profiles(fake.url, min_workers=1), **TEST_SETTINGS).start(wait=False) as pool:
        with pool.client(broker_timeout=60) as client:
            client.request("anthropic", "messages.create", **anthropic_args("first"))
            answered = time.time()
            assert not done.exists(), "the anthropic call waited for the openai import"
            client.request("openai", "chat.completions.create", **openai_args("second"))
            assert float(done.read_text()) > answered


def test_a_pool_stops_at_once_while_its_zygote_is_still_importing(fake, tmp_path, monkeypatch, own_processes):
    """A script that ends before the second SDK is in must not wait for the import (nor for a grace of 1 s)."""
    slow_openai(tmp_path / "path", delay=8.0)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "path"), os.environ.get("PYTHONPATH", "")]))
    pool = Pool(profiles=profiles(fake.url, min_workers=1), **TEST_SETTINGS).start(wait=False)
    with pool.client(broker_timeout=60) as client:
        client.request("anthropic", "messages.create", **anthropic_args("before the stop"))
    started = time.monotonic()
    pool.stop()
    assert time.monotonic() - started < 1.0
