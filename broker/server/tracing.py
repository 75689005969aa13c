"""OpenTelemetry traces of the pool's requests, in the GenAI semantic conventions (optional extra
`isopool[otel]`, configured by the standard `OTEL_*` variables; off, and free, without them).

The broker makes every span, not the workers: a worker whose stream stalls is SIGKILLed, and the
spans it had not exported yet would die with it, the stalled attempt's first. So for each request
the broker opens a span (`isopool.request`, a child of the caller's span when the caller sent a
`traceparent`) and, for each attempt, a CLIENT span named `{gen_ai.operation.name} {model}` whose
`traceparent` the worker sends on to the provider; it ends with what the provider reported of its
answer (`gen_ai.response.*`, `gen_ai.usage.*`: Kind.USAGE, even for an attempt whose worker was
killed). Stalls, kills, retries and fallbacks are span
events of the request. The attempt's span carries the call's parameters (`gen_ai.request.*`, read from
its payload once per request, genai.py); message content only when the environment opts in
(OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT), never a key.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec

from ..config import DEFAULT_BASE_URLS, Settings
from ..protocol import Spent
from ..routes import groups
from . import genai

log = logging.getLogger(__name__)

# gen_ai.operation.name by the SDK method (or HTTP path) a call runs; others are named by themselves.
_OPERATIONS = {
    "messages.create": "chat",
    "chat.completions.create": "chat",
    "responses.create": "chat",
    "completions.create": "text_completion",
    "embeddings.create": "embeddings",
    "/v1/messages": "chat",
    "/v1/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}
_PROVIDERS = {"anthropic": "anthropic", "openai": "openai"}
_TRACEPARENT_MAX = 512  # the W3C limit, as OpenTelemetry's propagator applies it
_WARN_EVERY = 60.0  # seconds between warnings about ignored traceparents


def configured() -> bool:
    """Whether the OTEL_* environment asks for traces or metrics: an OTLP endpoint is set, the SDK not
    disabled, and not both signals turned off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if not (_exporter("OTEL_TRACES_EXPORTER") or _exporter("OTEL_METRICS_EXPORTER")):
        return False
    endpoints = (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    )
    return any(os.environ.get(name) for name in endpoints)


def from_environment(settings: Settings) -> Tracing | None:
    """The broker's tracing when the environment configures it and the extra is installed, else None."""
    if not configured():
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed: "
                    "pip install 'isopool[otel]' to export traces")  # fmt: skip
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "isopool"})
    provider = TracerProvider(resource=resource)
    if _exporter("OTEL_TRACES_EXPORTER"):
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # its own thread: the loop never waits
    return Tracing(settings, provider, _meter_provider(resource) if _exporter("OTEL_METRICS_EXPORTER") else None)


def _exporter(variable: str) -> bool:
    """Whether this signal is exported (OTLP, the default), not turned off with `none`."""
    return os.environ.get(variable, "otlp").strip().lower() != "none"


def _meter_provider(resource: Any) -> Any:
    """The GenAI client metrics' provider: OTLP/HTTP every OTEL_METRIC_EXPORT_INTERVAL (its own thread), with
    the bucket boundaries the conventions ask for."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    views = [View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(bounds))
             for name, bounds in _BUCKETS.items()]  # fmt: skip
    return MeterProvider([PeriodicExportingMetricReader(OTLPMetricExporter())], resource=resource, views=views)


class Tracing:
    def __init__(self, settings: Settings, provider: Any, meters: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._provider, self._meters = provider, meters
        self._tracer = provider.get_tracer("isopool")
        self._metrics = _Metrics(meters.get_meter("isopool")) if meters is not None else None
        self._propagator = TraceContextTextMapPropagator()
        self.content = genai.capture_content()  # message content on the spans (opt-in)
        self.ignored_traceparents, self._warned = 0, -_WARN_EVERY
        self._wall = time.time_ns() - time.monotonic_ns()  # the broker's clock is monotonic; spans want wall time
        self._servers = {
            key: (profile.kind, _host(profile.kind, profile.base_url))
            for key, (_, _, profile) in groups(settings).items()
        }

    def _ns(self, now: float) -> int:
        return self._wall + int(now * 1e9)

    def request_started(self, req: Any, now: float) -> Any:
        """The request's span, under the caller's when it sent a `traceparent`."""
        parent = self._parent(req.submit.traceparent) if req.submit.traceparent else None
        req.genai = genai.request_attributes(req.payload)
        if self.content:
            req.genai |= _content_attributes(req.payload)
        return self._tracer.start_span(
            "isopool.request",
            context=parent,
            kind=self._trace.SpanKind.INTERNAL,
            start_time=self._ns(now),
            attributes={
                "isopool.profile": req.profile,
                "gen_ai.request.model": req.submit.model,
                "isopool.stream": req.submit.stream,
            },  # fmt: skip
        )

    def _parent(self, traceparent: str) -> Any:
        """The caller's context; None for a `traceparent` past the W3C limit (counted, and said at most once
        a minute: the propagator would warn at every request of a caller that sends one)."""
        if len(traceparent) <= _TRACEPARENT_MAX:
            return self._propagator.extract({"traceparent": traceparent})
        self.ignored_traceparents += 1
        if time.monotonic() - self._warned >= _WARN_EVERY:
            self._warned = time.monotonic()
            log.warning("ignored a traceparent of %d characters (over %d; %d so far): those requests start traces "
                        "of their own", len(traceparent), _TRACEPARENT_MAX, self.ignored_traceparents)  # fmt: skip
        return None

    def attempt_started(self, req: Any, now: float) -> tuple[Any, str]:
        """The attempt's CLIENT span (a child of the request's), and the `traceparent` that names it."""
        kind, host = self._servers.get(req.group, ("", ""))
        operation = _OPERATIONS.get(req.submit.method, req.submit.method or "call")
        model = req.model or req.submit.model
        attributes = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": _PROVIDERS.get(kind, kind),
            "gen_ai.request.model": model,
            "server.address": host,
            "isopool.attempt": req.attempt,
            "isopool.retried": req.attempt > 1,  # this attempt is a retry (or a fallback) of the request
            "isopool.profile": req.profile,
            "isopool.deployment": req.group,
            "isopool.worker": req.worker.ident.decode() if req.worker is not None else "",
            **(req.genai or {}),
        }
        span = self._tracer.start_span(
            f"{operation} {model}".strip(),
            context=self._trace.set_span_in_context(req.span),
            kind=self._trace.SpanKind.CLIENT,
            start_time=self._ns(now),
            attributes=attributes,
        )
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return span, carrier.get("traceparent", "")

    def attempt_ended(self, req: Any, outcome: str, reason: Any, now: float) -> None:
        """End the attempt's span with how it went and what its provider reported; record its metrics.
        `reason`: the Reason it failed for, if it was one (a stall, a kill)."""
        span, spent = req.attempt_span, req.spent
        span.set_attribute("isopool.delivered_events", req.delivered)
        if spent is not None:
            span.set_attributes(_response_attributes(spent))
        if req.output is not None and self.content:
            messages = req.output.messages(spent.finish_reasons if spent is not None else [])
            span.set_attribute("gen_ai.output.messages", _JSON(messages).decode())
        if outcome != "ok":
            span.set_attribute("error.type", outcome)
            if reason is not None and reason.is_stall:
                span.set_attribute("isopool.stall_reason", outcome)
            if reason is not None and reason.is_kill:
                span.set_attribute("isopool.kill_reason", outcome)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, outcome))
        span.end(end_time=self._ns(now))
        if self._metrics is not None:
            first = None if req.first_event_at is None or not req.submit.stream else req.first_event_at - req.sent_at
            self._metrics.record(span.attributes, outcome, spent, now - req.sent_at, first)

    def chunk(self, req: Any, now: float) -> None:
        """A stream's chunk after its first (one EVENT message: what the caller receives at once)."""
        if self._metrics is not None:
            attributes = {key: req.attempt_span.attributes[key] for key in _METRIC_ATTRIBUTES}
            self._metrics.per_chunk.record(now - req.last_event_at, attributes)

    def event(self, span: Any, name: str, now: float, **attributes: Any) -> None:
        span.add_event(name, attributes=attributes, timestamp=self._ns(now))

    def request_ended(self, span: Any, outcome: str, attempts: int, now: float) -> None:
        span.set_attribute("isopool.attempts", attempts)
        if outcome != "ok":
            span.set_attribute("error.type", outcome)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, outcome))
        span.end(end_time=self._ns(now))

    def close(self) -> None:
        """Export what is left (bounded by the exporters' own timeouts), then stop."""
        self._provider.shutdown()
        if self._meters is not None:
            self._meters.shutdown()


# The GenAI client metrics' bucket boundaries, as the conventions give them.
_SECONDS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
# (the conventions give none for it: those of the server's time_per_output_token)
_CHUNK_SECONDS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
_BUCKETS = {
    "gen_ai.client.operation.duration": _SECONDS,
    "gen_ai.client.operation.time_to_first_chunk": _SECONDS,
    "gen_ai.client.operation.time_per_output_chunk": _CHUNK_SECONDS,
    "gen_ai.client.token.usage": [4**i for i in range(14)],  # 1, 4, 16, ... 67108864
}
# The span attributes the metrics carry (the conventions' required and recommended ones).
_METRIC_ATTRIBUTES = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "server.address")


class _Metrics:
    """The GenAI client metrics, one measurement per provider attempt (the pool's own unit of work)."""

    def __init__(self, meter: Any) -> None:
        self.duration = meter.create_histogram("gen_ai.client.operation.duration", unit="s",
                                               description="GenAI operation duration")  # fmt: skip
        self.first_chunk = meter.create_histogram("gen_ai.client.operation.time_to_first_chunk", unit="s",
                                                  description="Time to receive the first chunk")  # fmt: skip
        self.per_chunk = meter.create_histogram("gen_ai.client.operation.time_per_output_chunk", unit="s",
                                                description="Time per output chunk after the first")  # fmt: skip
        self.tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                             description="Number of input and output tokens used")  # fmt: skip

    def record(self, span: Any, outcome: str, spent: Spent | None, took: float, first: float | None) -> None:
        attributes = {key: span[key] for key in _METRIC_ATTRIBUTES if key in span}
        if spent is not None and spent.response_model:
            attributes["gen_ai.response.model"] = spent.response_model
        if outcome != "ok":
            attributes["error.type"] = outcome
        self.duration.record(took, attributes)
        if first is not None:
            self.first_chunk.record(first, attributes)
        if spent is not None:
            for kind, count in (("input", spent.input_tokens), ("output", spent.output_tokens)):
                self.tokens.record(count, attributes | {"gen_ai.token.type": kind})


def _response_attributes(spent: Spent) -> dict[str, Any]:
    """What the provider reported of the attempt's answer, in the GenAI conventions (the input tokens
    count those read from and written to the cache, as the conventions ask)."""
    found = {
        "gen_ai.response.id": spent.response_id,
        "gen_ai.response.model": spent.response_model,
        "gen_ai.response.finish_reasons": spent.finish_reasons,
    }
    attributes: dict[str, Any] = {key: value for key, value in found.items() if value}
    return attributes | {
        "gen_ai.usage.input_tokens": spent.input_tokens,
        "gen_ai.usage.output_tokens": spent.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": spent.cache_read_tokens,
        "gen_ai.usage.cache_creation.input_tokens": spent.cache_write_tokens,
    }


_JSON = msgspec.json.Encoder().encode


def _content_attributes(payload: bytes) -> dict[str, str]:
    """The call's messages and system instructions (opt-in), as the conventions' JSON strings."""
    messages, system = genai.input_content(payload)
    found = {"gen_ai.input.messages": messages, "gen_ai.system_instructions": system}
    return {key: _JSON(value).decode() for key, value in found.items() if value}


def _host(kind: str, base_url: str | None) -> str:
    return urlsplit(base_url or DEFAULT_BASE_URLS.get(kind, "")).hostname or ""
