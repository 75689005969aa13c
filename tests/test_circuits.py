"""Circuit breaking: the state machine, driven with a clock of plain numbers, then through a real pool."""

from __future__ import annotations

import math
import random
import time

import httpx2 as httpx  # the SDKs' own HTTP client: installed with them (httpx is only in an extra)
import pytest

from broker import Pool
from broker.server.circuits import Circuit, Limits, State
from broker.shim import openai as shim_openai

from .conftest import TEST_SETTINGS, openai_args


def circuit(failures: int = 3, cooldown: float = 5.0, cooldown_max: float = 10.0) -> Circuit:
    return Circuit(Limits(failures, cooldown, cooldown_max), rng=random.Random(1))


def test_it_opens_after_the_failures_in_a_row_and_a_success_resets_the_count():
    c = circuit()
    c.failure(0.0)
    c.failure(0.1)
    c.success(0.2)  # the count is of failures in a row
    c.failure(0.3)
    c.failure(0.4)
    assert c.state is State.CLOSED and c.available(0.5) and not c.admit(0.5)
    c.failure(0.5)
    assert c.state is State.OPEN and c.opened == 1
    assert 0.5 + 4.0 <= c.until <= 0.5 + 6.0  # 5 s ± 20%
    assert not c.available(c.until - 0.01)


def test_one_probe_after_the_cooldown_closes_it_on_success():
    c = circuit()
    for t in range(3):
        c.failure(t)
    assert c.available(c.until) and c.admit(c.until)  # the probe
    assert c.state is State.HALF_OPEN
    assert not c.available(c.until + 0.1)  # only one probe at a time
    c.success(c.until + 0.2)
    assert c.state is State.CLOSED and c.available(c.until + 0.3) and not c.admit(c.until + 0.3)
    assert c.transitions == ["open", "half_open", "closed"] and c.probes == 1


def test_a_failed_probe_doubles_the_cooldown_up_to_the_cap():
    c = circuit(cooldown=1.0, cooldown_max=3.0)
    for t in range(3):
        c.failure(t)
    lengths = []
    for _ in range(4):
        start = c.until
        assert c.available(start) and c.admit(start)
        c.failure(start)
        lengths.append(c.until - start)
    assert 1.6 <= lengths[0] <= 2.4 and all(2.4 <= n <= 3.6 for n in lengths[1:])  # 2, then capped at 3 (±20%)
    assert c.state is State.OPEN
    assert c.admit(c.until)
    c.success(c.until)
    for t in range(3):
        c.failure(100.0 + t)
    assert c.until - 102.0 <= 1.2  # closing put the cooldown back to its base


def test_a_probe_ended_for_our_own_reasons_frees_the_slot():
    c = circuit()
    for t in range(3):
        c.failure(t)
    assert c.admit(c.until)
    c.abandoned()  # cancelled by its caller, a crashed worker: nothing learnt about the provider
    assert c.state is State.HALF_OPEN and c.available(c.until) and c.admit(c.until)


def test_a_429_naming_its_wait_opens_it_for_that_long_at_once():
    c = circuit()
    c.failure(10.0, retry_after=4.0)
    assert c.state is State.OPEN and c.until == 14.0
    c.failure(11.0, retry_after=60.0)  # capped; re-opening never shortens the wait
    assert c.until == 21.0
    d = circuit()
    d.failure(10.0, retry_after=0.2)  # a short wait is an ordinary failure
    assert d.state is State.CLOSED and d.failures == 1


def test_a_straggler_success_while_open_changes_nothing():
    c = circuit()
    for t in range(3):
        c.failure(t)
    until = c.until
    c.success(3.0)
    assert c.state is State.OPEN and c.until == until and c.opens_at(3.0) == until
    assert c.opens_at(until + 1) == until + 1


def test_zero_failures_turns_it_off():
    c = circuit(failures=0)
    for t in range(10):
        c.failure(t, retry_after=5.0)
    assert c.state is State.CLOSED and c.available(10.0) and not c.admit(10.0)


def test_when_every_deployment_is_open_the_one_tried_anyway_is_the_probe():
    c = circuit()
    for t in range(3):
        c.failure(t)
    assert not c.available(2.5)
    assert c.admit(2.5) and c.state is State.HALF_OPEN  # "panic": sent before its cooldown ended
    c.failure(2.6)
    assert c.state is State.OPEN and c.opened == 2  # a failed probe opens it again


# ----- through a real pool: the gateway, the real fake provider over HTTP ------------------------

OUTAGE = 1.5  # seconds the primary answers 503 to everything, from its first request


def _pool(fake, **settings):
    base = {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1, "max_workers": 2}
    primary = {**base, "fallbacks": [{"profile": "backup", "model": "gpt-fake"}]}
    return Pool(profiles={"primary": primary, "backup": base}, http="127.0.0.1:0", **dict(TEST_SETTINGS, **settings))


def _ask(pool, model: str, prompt: str, via: str = "gateway") -> tuple[int, dict, dict]:
    """One chat call through the gateway (a plain HTTP client) or the shim (the SDK at its defaults)."""
    if via == "shim":
        with shim_openai.OpenAI(pool=pool, pool_profile="primary") as sdk:
            raw = sdk.chat.completions.with_raw_response.create(**openai_args(prompt, model=model))
            return raw.status_code, raw.parse().model_dump(), raw.headers
    response = httpx.post(pool.http_url + "/v1/chat/completions", json=openai_args(prompt, model=model), timeout=60)
    return response.status_code, response.json(), response.headers


@pytest.mark.parametrize("via", ["gateway", "shim"])
def test_a_primary_down_then_healthy_is_served_by_the_fallback_then_used_again(fake, via):
    """F14 scaled: during the outage the calls are answered by the backup, and the primary is asked
    only by the calls that open its circuit and then one probe per cooldown (no hammering); once it
    is healthy a probe closes the circuit and every later call is the primary's again."""
    model = f"gpt-fake@unavailable:for={OUTAGE}"
    fake.reset()
    served_by, seen, circuit = [], [], None
    with _pool(fake, circuit_cooldown=0.2, circuit_cooldown_max=0.4) as pool, pool.client() as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, body, headers = _ask(pool, model, f"call {len(served_by)}", via)
            assert status == 200 and body["choices"][0]["message"]["content"], body  # every call answered
            assert int(headers["x-isopool-attempts"]) <= 3  # within the call's budget
            served_by.append(headers["x-isopool-profile"])
            circuit = client.snapshot().circuits.get(f"primary/{model}")
            seen.append(circuit.state if circuit else "none")
            if circuit and circuit.state == "closed" and circuit.opened and served_by[-3:] == ["primary"] * 3:
                break
            time.sleep(0.05)
    assert circuit is not None and circuit.transitions[:2] == ["open", "half_open"], circuit
    assert circuit.transitions[-1] == "closed" and set(circuit.transitions) == {"open", "half_open", "closed"}
    first_back = served_by.index("primary")
    assert first_back > 2 and set(served_by[:first_back]) == {"backup"}  # the outage: all from the backup
    assert set(served_by[first_back:]) == {"primary"}  # healthy again: never the backup after
    injected = fake.stats()["faults"].get("unavailable", 0)
    # the calls that opened it (2 + 1 attempts), then one probe per cooldown at most (0.2 s, then 0.4)
    assert 3 <= injected <= 3 + math.ceil(OUTAGE / 0.2) + 1, (injected, served_by, seen)


def test_an_open_circuit_costs_a_call_no_attempt_and_no_timeout(fake):
    """A silent primary: the first call waits out one headers_timeout and falls back, opening the
    circuit (circuit_failures = 1); the next calls go straight to the backup, one attempt each."""
    model = "gpt-fake@no-headers"
    fake.reset()  # a fault fires once per conversation: forget those of other tests
    with _pool(fake, headers_timeout=1.0, circuit_failures=1, circuit_cooldown=30, circuit_cooldown_max=30) as pool:
        started = time.monotonic()
        status, _, headers = _ask(pool, model, "opens it")
        assert status == 200 and headers["x-isopool-profile"] == "backup" and time.monotonic() - started >= 1.0
        for i in range(3):
            started = time.monotonic()
            status, _, headers = _ask(pool, model, f"after {i}")
            took = time.monotonic() - started
            assert (status, headers["x-isopool-profile"], headers["x-isopool-attempts"]) == (200, "backup", "1")
            assert headers["x-isopool-rescue"] == "fallback" and took < 0.9  # not another headers_timeout
        with pool.client() as client:
            circuit = client.snapshot().circuits[f"primary/{model}"]
        assert circuit.state == "open" and circuit.opened == 1 and circuit.until_in > 20


def test_a_probe_of_a_silent_upstream_costs_its_caller_the_probe_timeout_only(fake):
    """The probe is one real call: against a still-silent primary it waits `circuit_probe_timeout`
    for headers, not the whole `headers_timeout`, then falls back like any call."""
    model = "gpt-fake@no-headers"
    settings = dict(headers_timeout=2.0, circuit_failures=1, circuit_cooldown=0.3, circuit_cooldown_max=30,
                    circuit_probe_timeout=0.3)  # fmt: skip
    fake.reset()  # a fault fires once per conversation: forget those of other tests
    with _pool(fake, **settings) as pool:
        status, _, headers = _ask(pool, model, "opens it")
        assert status == 200 and headers["x-isopool-profile"] == "backup"
        time.sleep(0.5)  # past the cooldown (0.3 s + 20%): the next call is the probe
        started = time.monotonic()
        status, _, headers = _ask(pool, model, "the probe")
        took = time.monotonic() - started
        assert (status, headers["x-isopool-profile"], headers["x-isopool-attempts"]) == (200, "backup", "2")
        assert took < 1.5, took  # 0.3 s of silence, then the backup; not another 2 s headers_timeout
        with pool.client() as client:
            circuit = client.snapshot().circuits[f"primary/{model}"]
        assert circuit.transitions == ["open", "half_open", "open"] and circuit.probes == 1
