"""`serve --metrics`: the Prometheus endpoint, scraped during a faulty run, agrees with the
broker's own stats; the child serving it goes away with the pool."""

from __future__ import annotations

import urllib.request

import psutil
from prometheus_client.parser import text_string_to_metric_families

from broker import Pool

from .conftest import TEST_SETTINGS, anthropic_args, fault, profiles, wait_for


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_match_the_stats_of_a_faulty_run(fake, own_processes):
    with Pool(profiles=profiles(fake.url), metrics="127.0.0.1:0", **TEST_SETTINGS) as pool, pool.client() as client:
        assert pool.metrics_url.endswith("/metrics")
        calls = [client.submit("anthropic", "messages.create", stream=True, stale_timeout=0.5,
                               **anthropic_args(f"m{i}"), **fault("stall-ping:after=1,times=1"))
                 for i in range(3)]  # fmt: skip
        calls += [client.submit("anthropic", "messages.create", **anthropic_args(f"ok{i}")) for i in range(5)]
        calls.append(client.submit("anthropic", "messages.create", **anthropic_args("500"), **fault("http-500")))
        mid_run = scrape(pool.metrics_url)  # scraped while the stalls are being cut
        assert ("isopool_requests_in_flight", ()) in mid_run
        for call in calls[3:]:
            call.result()
        for call in calls[:3]:  # stalled after one event the caller had not read yet: retried, or cut
            try:
                list(call)
            except Exception:  # noqa: BLE001 - a StreamStalled is a correct answer too
                pass
        wait_for(lambda: client.stats()["in_flight"] == 0, 10, "every request to end")
        stats = client.stats()
        scraped = scrape(pool.metrics_url)
        assert stats["stalls"]["stale_timeout"] >= 3
        for outcome, count in stats["requests"].items():
            assert scraped[("isopool_requests_total", (("outcome", outcome),))] == count
        for kind, count in stats["stalls"].items():
            assert scraped[("isopool_stalls_total", (("kind", kind),))] == count
        for reason, count in stats["kills"].items():
            assert scraped[("isopool_worker_kills_total", (("reason", reason),))] == count
        assert scraped[("isopool_retries_total", ())] == stats["retries"]
        assert stats["retries_by_reason"] and sum(stats["retries_by_reason"].values()) == stats["retries"]
        for reason, count in stats["retries_by_reason"].items():
            assert scraped[("isopool_retries_by_reason_total", (("reason", reason),))] == count
        assert stats["rescued"].get("retry", 0) >= 1  # the 500's call, answered at its second attempt
        for how, count in stats["rescued"].items():
            assert scraped[("isopool_rescued_total", (("how", how),))] == count
        assert stats["circuits"]  # the stalls and the 500 counted on the fake model's circuit
        for key, circuit in stats["circuits"].items():
            state = {"closed": 0, "open": 1, "half_open": 2}[circuit["state"]]
            assert scraped[("isopool_circuit_state", (("circuit", key),))] == state
            assert scraped[("isopool_circuit_opened_total", (("circuit", key),))] == circuit["opened"]
        assert scraped[("isopool_worker_respawns_total", ())] == stats["respawns"]
        assert scraped[("isopool_queue_depth", (("profile", "anthropic"),))] == 0
        workers = sum(v for (name, _), v in scraped.items() if name == "isopool_workers")
        assert workers == len(stats["workers"])
        assert scraped[("isopool_request_duration_seconds_count", ())] == stats["latency"]["count"]
        assert scraped[("isopool_request_duration_seconds_bucket", (("le", "+Inf"),))] == stats["latency"]["count"]
        child = next(p for p in psutil.Process(pool.pid).children() if "broker.http.metrics" in " ".join(p.cmdline()))
    wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10, "the metrics child to exit")
