"""`isopool serve --metrics HOST:PORT`: the pool's counters, gauges and histograms for
Prometheus, through its official client library.

A child process of the broker (like the HTTP gateway): each scrape asks the broker for
its stats (one STATS round trip) and renders them, so the broker's loop carries no HTTP
server, no thread and no lock. It exits when the broker closes its stdin.

Metrics (all prefixed `isopool_`): `requests_total{outcome}` (accepted, ok, error:<code>,
cancelled), `rejected_total{code}`, `stalls_total{kind}`, `worker_kills_total{reason}`,
`worker_spawns_total`, `worker_respawns_total`, `zygote_restarts_total`, `retries_total`,
`retries_by_reason_total{reason}` (http_429, http_5xx, provider_connection, headers_timeout, ...),
`fallbacks_total{route}` ("from>to", profile/model), `rescued_total{how}` (retry, deployment, fallback,
context-fallback, and streams continued: prefill, replay), `continuations_total{outcome}` (continuation
attempts, `<strategy>:<outcome>`), `circuit_state{circuit}` (0 closed, 1 open, 2 half-open) and
`circuit_opened_total{circuit}` by `deployment/model`,
`requests_in_flight`, `queue_depth{profile}`, `workers{profile,deployment,state}`,
`request_duration_seconds` and `time_to_first_event_seconds` (histograms),
`tokens_total{profile,model,type}` (input, output, cache_read, cache_write: as the providers reported them;
input counts the cached tokens too) and, with a price table, `cost_total{profile,model}` (its currency);
the same by the caller a request named (a gateway token's name): `caller_tokens_total{caller,type}`,
`caller_cost_total{caller}`.
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Iterator
from typing import Any

import msgspec
from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..client.client import Client
from ..endpoints import cannot_listen, http_url, listen_address
from ..processes import say_ready
from ..protocol import BUCKETS, HistogramSnapshot, Listening, Snapshot

_CIRCUIT_STATES = {"closed": 0, "open": 1, "half_open": 2}


class PoolCollector(Collector):
    """Renders one stats snapshot of the broker per scrape."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def collect(self) -> Iterator[Any]:
        return iter(families(self.client.snapshot()))


def families(s: Snapshot) -> list[Any]:
    """The metric families of one stats snapshot (see the module docstring)."""
    out: list[Any] = []

    def counters(name: str, doc: str, label: str, values: dict[str, int]) -> None:
        family = CounterMetricFamily(f"isopool_{name}", doc, labels=[label])
        for key, value in sorted(values.items()):
            family.add_metric([key], value)
        out.append(family)

    counters("requests", "Requests by outcome (accepted, ok, error:<code>, cancelled)", "outcome", s.requests)
    counters("rejected", "Messages refused or unreadable, by error code", "code", s.rejected)
    counters("stalls", "Stalls detected, by kind", "kind", s.stalls)
    counters("worker_kills", "Workers killed, by reason", "reason", s.kills)
    for name, doc in (("spawns", "Workers forked"), ("respawns", "Workers forked to replace a killed one")):
        out.append(CounterMetricFamily(f"isopool_worker_{name}", doc, value=getattr(s, name)))
    out.append(CounterMetricFamily("isopool_zygote_restarts", "Zygotes replaced", value=s.zygote_restarts))
    out.append(CounterMetricFamily("isopool_retries", "Unseen requests re-run on a fresh worker", value=s.retries))
    counters("retries_by_reason", "Retries by the pool, by what failed", "reason", s.retries_by_reason)
    counters("fallbacks", "Calls moved to another target of their chain, by from>to", "route", s.fallbacks)
    counters("rescued", "Calls answered after a failed attempt, by how (retry, deployment, fallback, "
             "context-fallback, prefill, replay)", "how", s.rescued)  # fmt: skip
    counters("continuations", "Continuation attempts, by <strategy>:<outcome>", "outcome", s.continuations)
    states = GaugeMetricFamily("isopool_circuit_state", "Circuit breakers by deployment/model: 0 closed, 1 open, "
                               "2 half-open", labels=["circuit"])  # fmt: skip
    for key, circuit in sorted(s.circuits.items()):
        states.add_metric([key], _CIRCUIT_STATES[circuit.state])
    out.append(states)
    counters("circuit_opened", "Times a circuit breaker opened, by deployment/model", "circuit",
             {key: c.opened for key, c in s.circuits.items()})  # fmt: skip
    out.append(GaugeMetricFamily("isopool_requests_in_flight", "Requests accepted and not answered",
                                 value=s.in_flight))  # fmt: skip
    queued = GaugeMetricFamily("isopool_queue_depth", "Requests waiting for a worker", labels=["profile"])
    for profile, depth in sorted(s.queued.items()):
        queued.add_metric([profile], depth)
    out.append(queued)
    workers = GaugeMetricFamily("isopool_workers", "Workers by profile, deployment and state",
                                labels=["profile", "deployment", "state"])  # fmt: skip
    by_state = collections.Counter((w.profile, w.deployment, w.state) for w in s.workers)
    for (profile, deployment, state), count in sorted(by_state.items()):
        workers.add_metric([profile, deployment, state], count)
    out.append(workers)
    out += _tokens(s)
    out.append(_histogram("isopool_request_duration_seconds", "Accepted to answered, successful requests",
                          s.latency))  # fmt: skip
    out.append(_histogram("isopool_time_to_first_event_seconds", "Sent to a worker to its first real event",
                          s.first_event))  # fmt: skip
    return out


def _tokens(s: Snapshot) -> list[Any]:
    tokens = CounterMetricFamily("isopool_tokens", "Tokens the providers reported, by profile, the model that "
                                 "answered and type (input counts the cached ones too)",
                                 labels=["profile", "model", "type"])  # fmt: skip
    cost = CounterMetricFamily("isopool_cost", f"Cost of the tokens ({s.prices})", labels=["profile", "model"])
    by_caller = CounterMetricFamily("isopool_caller_tokens", "Tokens the providers reported, by the caller a "
                                    "request named (a gateway token's name) and type",
                                    labels=["caller", "type"])  # fmt: skip
    caller_cost = CounterMetricFamily("isopool_caller_cost", f"Cost of the tokens by caller ({s.prices})",
                                      labels=["caller"])  # fmt: skip
    for (tokens_of, cost_of), tallies in (((tokens, cost), s.tokens), ((by_caller, caller_cost), s.tokens_by_caller)):
        for key, t in sorted(tallies.items()):
            labels = list(key.partition("/")[::2]) if tallies is s.tokens else [key]
            for kind in ("input", "output", "cache_read", "cache_write"):
                tokens_of.add_metric([*labels, kind], getattr(t, kind))
            if t.cost is not None:
                cost_of.add_metric(labels, t.cost)
    return [tokens, by_caller, cost, caller_cost] if s.prices else [tokens, by_caller]


def _histogram(name: str, doc: str, h: HistogramSnapshot) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound in BUCKETS:
        cumulative += h.buckets[f"le_{bound:g}"]
        buckets.append((f"{bound:g}", cumulative))
    buckets.append(("+Inf", h.count))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=(h.mean or 0.0) * h.count)


def main() -> None:
    parser = argparse.ArgumentParser(description="isopool's Prometheus endpoint (started by `isopool serve --metrics`)")
    parser.add_argument("--url", required=True, help="the broker's frontend")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args()
    sys.stdin.readline()  # the broker's hand-over line (the gateway gets its token there; nothing here)
    host, port = listen_address(args.listen)
    registry = CollectorRegistry(auto_describe=False)
    with Client(args.url) as client:
        registry.register(PoolCollector(client))
        try:
            server, _ = start_http_server(port, host, registry=registry)
        except OSError as exc:
            raise cannot_listen("metrics", host, port, exc) from None
        say_ready(msgspec.json.encode(Listening(http_url(host, server.server_port) + "/metrics")).decode())
        while sys.stdin.buffer.read1(4096):  # until the broker closes our stdin (or dies)
            pass
        server.shutdown()


if __name__ == "__main__":
    main()
