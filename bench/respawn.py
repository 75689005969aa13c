"""respawn: SIGKILL of an idle worker until its replacement is ready (zygote fork, against a
fresh interpreter importing the SDKs), stale recovery (the moment `first_event_timeout`
expires until the retry's first event, next to a clean stream's first event), and how
late a stall is noticed after `stale_timeout`.

Targets: respawn <= 20 ms median; recovery <= 10 ms + a clean first event; detection
within 50 ms of the timeout."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any

from broker import Pool, StreamStalled
from broker.fake_provider import FAULT_HEADER, FakeProviderProcess

from .common import latency, ms, pick, result, target

ASK = {"model": "claude-bench", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
TIMEOUT = 0.2  # first_event_timeout and stale_timeout of the measured streams (the pool's floor lowered to it)
POLL = 0.001  # seconds between two looks at the workers while a respawn is awaited (a tight loop took a core)
RESPAWN_LIMIT = 30.0  # seconds a replacement may take before the run stops, saying so


def respawn(client: Any, repeat: int) -> list[float]:
    """Seconds from SIGKILL of a ready worker until the broker reports a ready replacement, `repeat` times."""
    times = []
    for _ in range(repeat):
        workers = {w["ident"]: w for w in client.stats()["workers"]}
        victim = next(w for w in workers.values() if w["state"] == "ready")
        start = time.perf_counter()
        os.kill(victim["pid"], 9)
        while not any(w["ident"] not in workers and w["state"] == "ready" for w in client.stats()["workers"]):
            if time.perf_counter() - start > RESPAWN_LIMIT:
                raise RuntimeError(
                    f"no replacement for worker {victim['ident']} ready {RESPAWN_LIMIT:g} s after its kill"
                )
            time.sleep(POLL)
        times.append(time.perf_counter() - start)
        time.sleep(0.05)
    return times


def fresh_interpreter(repeat: int) -> list[float]:
    code = "import anthropic, openai; anthropic.AsyncAnthropic(api_key='x'); openai.AsyncOpenAI(api_key='x')"
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-P", "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return times


def first_event(client: Any, args: dict, fault: str = "", timeout: float = 0.0) -> float:
    """Seconds from submit to the first event of a stream (minus `timeout`), read to the end."""
    headers = {FAULT_HEADER: fault} if fault else {}
    limits = {"first_event_timeout": timeout} if timeout else {}
    start = time.perf_counter()
    call = client.submit("anthropic", "messages.create", stream=True, extra_headers=headers, **limits, **args)
    events = iter(call)
    next(events)
    elapsed = time.perf_counter() - start - timeout
    for _ in events:  # read to the end (dropping the iterator early would cancel the call)
        pass
    return elapsed


def recovery(client: Any, repeat: int) -> tuple[list[float], list[float]]:
    """A stream whose first attempt sends only pings: the retry's first event minus the expiry;
    and, in turn with it, a clean stream's first event (the provider's part of that time)."""
    recovered, clean = [], []
    for i in range(repeat):
        args = {**ASK, "messages": [{"role": "user", "content": f"recovery {i}"}]}
        recovered.append(first_event(client, args, "stall-first:interval=0.05", TIMEOUT))
        clean.append(first_event(client, {**args, "max_tokens": 2}))
    return recovered, clean


def detection(client: Any, repeat: int) -> list[float]:
    """A seen stream stalling with pings: StreamStalled's arrival minus (last event + stale_timeout)."""
    lateness = []
    for i in range(repeat):
        args = {**ASK, "max_tokens": 10, "messages": [{"role": "user", "content": f"detect {i}"}]}
        call = client.submit("anthropic", "messages.create", stream=True, stale_timeout=TIMEOUT,
                             extra_headers={FAULT_HEADER: "stall-ping:after=5,interval=0.05"}, **args)  # fmt: skip
        last = time.perf_counter()
        try:
            for _ in call:
                last = time.perf_counter()
        except StreamStalled:
            lateness.append(time.perf_counter() - last - TIMEOUT)
    return lateness


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    repeat = pick(size, 30, 10, 2)
    with FakeProviderProcess() as fake:
        profiles = {"anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 4, "spare_workers": 2}}
        with (
            Pool(profiles=profiles, heartbeat_interval=0.2, request_min_timeout=TIMEOUT) as pool,
            pool.client() as client,
        ):
            time.sleep(0.5)
            forked = respawn(client, repeat)
            fresh = fresh_interpreter(pick(size, 3, 3, 1))
            recovered, clean = recovery(client, repeat)
            late = detection(client, repeat)
    added = ms(statistics.median(recovered) - statistics.median(clean))
    figures = {
        "respawn_zygote": latency(forked),
        "respawn_fresh_interpreter": latency(fresh),
        "recovery": latency(recovered),
        "clean_first_event": latency(clean),
        "recovery_added_ms": added,
        "detection_lateness": latency(late),
    }
    targets = [
        target("respawn median (ms)", figures["respawn_zygote"]["median_ms"], "<= 20", lambda v: v <= 20),
        target("recovery minus a clean first event (ms)", added, "<= 10", lambda v: v <= 10),
        target(
            "detection lateness median (ms)", figures["detection_lateness"]["median_ms"], "<= 50", lambda v: v <= 50
        ),  # fmt: skip
    ]
    return result({"repeat": repeat, "timeout_s": TIMEOUT}, figures, targets, started)


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    f = data["figures"]
    names = {
        "respawn_zygote": "SIGKILL -> replacement ready (zygote fork)",
        "respawn_fresh_interpreter": "fresh interpreter importing the SDKs",
        "recovery": "timeout -> first event of the retry",
        "clean_first_event": "clean stream: submit -> first event",
        "detection_lateness": "stall noticed - stale_timeout",
    }
    rows = [[label, f[key]["median_ms"], f[key]["p99_ms"], f[key]["n"]] for key, label in names.items()]
    return ["figure", "median ms", "p99 ms", "runs"], rows
