"""Per-connection limits: fair queueing between callers, each connection's share of the
pool and request rate, and a caller that stops reading its answers. One caller's flood
must never starve another, and every accepted request still ends in exactly one answer."""

from __future__ import annotations

import time

import psutil
import pytest

from broker import Pool, PoolSaturated, RateLimited
from broker.config import ConfigError
from broker.protocol import Code, Codec, Kind

from .conftest import TEST_SETTINGS, anthropic_args, fault, profiles, stop_reading_after_a_long_stream, wait_for


def one_worker(fake):
    return {"anthropic": profiles(fake.url)["anthropic"] | {"min_workers": 1, "max_workers": 1, "spare_workers": 0}}


def test_a_flooding_caller_delays_another_by_one_turn_not_by_its_backlog(fake, own_processes):
    with Pool(profiles=one_worker(fake), **TEST_SETTINGS) as pool, pool.client() as flood, pool.client() as other:
        backlog = [
            flood.submit(
                "anthropic", "messages.create", **anthropic_args(f"flood {i}"), **fault("slow-first:delay=0.1")
            )
            for i in range(30)
        ]
        wait_for(lambda: other.stats()["queued"]["anthropic"] >= 25, 10, "the flood to be queued")
        assert other.request("anthropic", "messages.create", **anthropic_args("mine")).status == 200
        served_before_mine = other.stats()["requests"]["ok"] - 1
        # FIFO would serve all 30 first (~3 s); turns between connections serve at most the running one and one more
        assert served_before_mine <= 2, served_before_mine
        assert all(call.result().status == 200 for call in backlog)


def test_a_connection_over_its_share_is_refused_and_others_are_served(fake, own_processes):
    settings = dict(TEST_SETTINGS, client_queue_limit=3)
    with Pool(profiles=one_worker(fake), **settings) as pool, pool.client() as greedy, pool.client() as other:
        calls = [
            greedy.submit("anthropic", "messages.create", **anthropic_args(f"g {i}"), **fault("slow-first:delay=0.3"))
            for i in range(5)
        ]
        assert other.request("anthropic", "messages.create", **anthropic_args("other")).status == 200
        outcomes = []
        for call in calls:
            try:
                outcomes.append(call.result().status)
            except PoolSaturated as exc:
                assert "client_queue_limit" in str(exc) and not isinstance(exc, RateLimited)
                outcomes.append("refused")
        assert outcomes == [200, 200, 200, "refused", "refused"]
        stats = other.stats()
        assert stats["in_flight"] == 0 and stats["rejected"] == {"saturated": 2}
        # its share comes back as its requests end
        assert greedy.request("anthropic", "messages.create", **anthropic_args("again")).status == 200


def test_client_rate_refuses_a_burst_with_the_time_to_wait(fake, own_processes):
    settings = dict(TEST_SETTINGS, client_rate=5.0, client_burst=2)
    with Pool(profiles=one_worker(fake), **settings) as pool, pool.client() as fast, pool.client() as other:
        calls = [fast.submit("anthropic", "messages.create", **anthropic_args(f"r {i}")) for i in range(10)]
        served, limited = 0, []
        for call in calls:
            try:
                call.result()
                served += 1
            except RateLimited as exc:
                assert exc.code == Code.RATE_LIMITED and "client_rate" in str(exc) and "retry in" in str(exc)
                limited.append(exc)
        assert 2 <= served <= 4 and served + len(limited) == 10  # the burst, plus what refilled meanwhile
        assert other.request("anthropic", "messages.create", **anthropic_args("other")).status == 200
        time.sleep(0.5)  # refilled
        assert fast.request("anthropic", "messages.create", **anthropic_args("later")).status == 200


def test_a_caller_that_stops_reading_is_cut_off_and_still_gets_one_answer(fake, own_processes):
    """Without a bound, the broker would buffer the whole 100,000-event stream for a caller
    that reads nothing. With `client_buffer` it cancels the request once that many messages
    wait, frees the worker, keeps serving others, and parks the final answer for the caller."""
    settings = dict(TEST_SETTINGS, client_buffer=50)
    with Pool(profiles=one_worker(fake), **settings) as pool, pool.client() as other:
        broker = psutil.Process(pool.pid)
        rss_before = broker.memory_info().rss
        codec = Codec()
        sock = stop_reading_after_a_long_stream(pool.url)
        try:
            wait_for(lambda: other.stats()["requests"].get("cancelled") == 1, 30, "the unread stream to be cut off")
            assert other.request("anthropic", "messages.create", **anthropic_args("meanwhile")).status == 200
            assert broker.memory_info().rss - rss_before < 50 * 2**20
            ends = []
            while sock.poll(2000):
                for kind, header, payload in codec.records(sock.recv_multipart()):
                    if kind in (Kind.RESULT, Kind.ERROR):
                        ends.append((kind, header, payload))
            assert len(ends) == 1, ends
            kind, header, payload = ends[0]
            assert kind == Kind.ERROR and header.rid == 1 and header.code == Code.CANCELLED
            assert "stopped reading" in codec.error(payload).message
        finally:
            sock.close(0)
        stats = other.stats()
        assert stats["in_flight"] == 0 and stats["connections"] <= 1


def test_client_limits_are_checked(fake):
    with pytest.raises(ConfigError, match="client_rate"):
        Pool(profiles=profiles(fake.url), client_rate=-1)
    with pytest.raises(ConfigError, match="client_buffer"):
        Pool(profiles=profiles(fake.url), client_buffer=0)
