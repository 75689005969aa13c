"""A provider (or a proxy at base_url) that reports absurd usage: found by the session-27 review. Each count is
cut to MAX_TOKENS where the worker reads it and where the broker bills it, so accounting never fails a call
nor the broker (two reports near 2**64 overflowed the broker's stats encoding and ended it)."""

from __future__ import annotations

from broker import Pool
from broker.protocol import MAX_TOKENS

from .conftest import TEST_SETTINGS, anthropic_args
from .hostile_provider import Hostile, answer

BIG = 2**64 - 1  # the largest count msgpack carries


def pool_at(url: str) -> Pool:
    return Pool(profiles={"anthropic": {"kind": "anthropic", "base_url": url, "min_workers": 1}}, **TEST_SETTINGS)


def test_huge_usage_reports_are_cut_and_the_broker_keeps_serving(own_processes):
    with Hostile(lambda body: iter(answer({"input_tokens": BIG, "output_tokens": 1}, {"output_tokens": 1}))) as p:
        with pool_at(p.url) as pool, pool.client(broker_timeout=5.0) as client:
            for n in range(2):
                list(client.submit("anthropic", "messages.create", stream=True, **anthropic_args(f"big {n}")))
            tokens = client.snapshot().tokens["anthropic/claude-fake"]
    assert tokens.input == 2 * MAX_TOKENS and tokens.attempts == 2


def test_a_report_past_what_a_message_carries_does_not_fail_an_answered_stream(own_processes):
    start = {"input_tokens": 2**63, "cache_read_input_tokens": 2**63, "output_tokens": 1}
    with Hostile(lambda body: iter(answer(start, {"output_tokens": 1}))) as p:
        with pool_at(p.url) as pool, pool.client(broker_timeout=5.0) as client:
            events = list(client.submit("anthropic", "messages.create", stream=True, **anthropic_args("past uint64")))
            assert len(events) == 6
            assert client.snapshot().tokens["anthropic/claude-fake"].input == MAX_TOKENS
