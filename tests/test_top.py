"""`isopool top` (issue 22): a running broker live, over the same socket as `isopool stats`."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from broker import Pool

from .conftest import TEST_SETTINGS, anthropic_args, fault

ISOPOOL = str(Path(sys.executable).with_name("isopool"))


def top_once(url: str) -> str:
    out = subprocess.run([ISOPOOL, "top", "--once", "--url", url], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_top_shows_the_streams_in_flight_and_the_kills_and_retries_behind_them(fake, own_processes):
    profiles = {"anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 2}}
    with Pool(profiles=profiles, **{**TEST_SETTINGS, "first_event_timeout": 1.0}) as pool, pool.client() as client:
        silent_first = fault("stall-first:interval=0.05")
        stalled = client.submit("anthropic", "messages.create", stream=True, **anthropic_args("top"), **silent_first)
        assert list(stalled)  # answered by its retry, after a kill for first_event_timeout
        drip = client.submit("anthropic", "messages.create", stream=True,
                             **{**anthropic_args("top: a slow stream"), "model": "claude-top-drip"},
                             **fault("drip:gap=0.3"))  # fmt: skip
        events = iter(drip)
        for _ in range(3):
            next(events)
        screen = top_once(pool.url)
        drip.cancel()
    assert "streams in flight" in screen and "anthropic / claude-top-drip" in screen
    line = next(x for x in screen.splitlines() if "claude-top-drip" in x)
    assert "anthropic." in line and "s ago" in line  # its worker, and when its latest event came
    assert "first_event_timeout" in screen and "kill" in screen and "retry" in screen


def test_top_refreshes_until_q_is_pressed_and_gives_the_terminal_back(pool):
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([ISOPOOL, "top", "--url", pool.url, "-n", "0.2"], stdin=terminal, stdout=terminal,
                            stderr=terminal, env={**os.environ, "COLUMNS": "160", "LINES": "60"})  # fmt: skip
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 20
        while seen.count(b"q quits") < 2 and time.monotonic() < deadline:  # the first screen, then a refresh
            if select.select([controller], [], [], 0.5)[0]:
                seen += os.read(controller, 65536)
        assert seen.count(b"q quits") >= 2, seen[-2000:]
        os.write(controller, b"q")
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
        os.close(controller)


def test_top_piped_prints_each_screen_and_says_when_the_broker_went_away(own_processes):
    """Found by the session-27 review: piped, top showed one screen, at its end, and a broker that went
    away mid-view read as one that never answered."""
    profiles = {"anthropic": {"kind": "anthropic", "base_url": "http://127.0.0.1:9", "min_workers": 0}}
    pool = Pool(profiles=profiles, **TEST_SETTINGS).start()
    try:
        proc = subprocess.Popen([ISOPOOL, "top", "--url", pool.url, "-n", "0.2"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "COLUMNS": "120"})  # fmt: skip
        assert proc.stdout is not None
        timer = threading.Timer(15, pool.stop)  # for a top that prints nothing before it ends
        timer.start()
        screens = 0
        while screens < 2 and (line := proc.stdout.readline()):  # read as they come, the broker still up
            screens += "streams in flight" in line
        timer.cancel()
    finally:
        pool.stop()
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert screens == 2
    assert proc.returncode == 1 and "stopped answering" in err and "Traceback" not in err
    assert "q quits" not in out  # no key reaches a pipe's reader
