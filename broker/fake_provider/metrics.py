"""The fake provider's `GET /metrics`: what a vLLM-like server shows Prometheus, so that
`isopool loadtest --server-metrics` can be tried and tested without a GPU.

Series (vLLM's names with `fake:` for `vllm:`): `fake:num_requests_running` (writing their answer),
`fake:num_requests_waiting` (before their first event: the fake's time to first token stands for a
real server's queue and prefill), `fake:generation_tokens_total` (tokens of the answers written to
their end, counted as each ends), `fake:request_success_total`, `fake:stream_events_total` (every
event written), and the histogram `fake:time_to_first_token_seconds` (from a stream's arrival to its
first event). The counters are read from the provider's own attributes when scraped, so serving an
event costs nothing more than it did; only the histogram is updated, once per stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .server import FakeProvider

# vLLM's own buckets for time to first token (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip


class FakeMetrics(Collector):
    """One provider's registry; `handle` serves it in the Prometheus text format."""

    def __init__(self, provider: FakeProvider) -> None:
        self.provider = provider
        self.registry = CollectorRegistry(auto_describe=False)
        self.ttft = Histogram("fake:time_to_first_token_seconds", "Seconds from a stream's arrival to its first "
                              "event.", buckets=TTFT_BUCKETS, registry=self.registry)  # fmt: skip
        self.registry.register(self)

    def collect(self) -> Iterator[Any]:
        p = self.provider
        yield GaugeMetricFamily("fake:num_requests_running", "Requests writing their answer.", p.active - p.waiting)
        yield GaugeMetricFamily("fake:num_requests_waiting", "Requests before their first event.", p.waiting)
        yield CounterMetricFamily("fake:generation_tokens", "Tokens of answers written to their end.", p.tokens)
        yield CounterMetricFamily("fake:request_success", "Answers written to their end.", p.completed)
        yield CounterMetricFamily("fake:stream_events", "Stream events written.", p.chunks)

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"content-type": CONTENT_TYPE_LATEST})
