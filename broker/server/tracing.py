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
from . import genai, semconv

log = logging.getLogger(__name__)

# gen_ai.operation.name by the SDK method a call runs, or by how its HTTP path ends (relative to any base URL:
# the gateway's, the shim's, a cloud's own form); others are named by themselves.
_OPERATIONS = {
    "messages.create": "chat",
    "chat.completions.create": "chat",
    "responses.create": "chat",
    "completions.create": "text_completion",
    "embeddings.create": "embeddings",
}
_PATH_ENDINGS = (
    ("/chat/completions", "chat"),  # before /completions; Azure's /openai/deployments/{name}/chat/completions too
    ("/messages", "chat"),
    ("/responses", "chat"),
    ("/invoke", "chat"),  # Bedrock's /model/{model}/invoke
    ("/invoke-with-response-stream", "chat"),
    (":rawPredict", "chat"),  # Vertex's .../models/{model}:rawPredict
    (":streamRawPredict", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
)
_PROVIDERS = {"anthropic": "anthropic", "openai": "openai"}
_TRACEPARENT_MAX = 512  # the W3C limit, as OpenTelemetry's propagator applies it
_WARN_EVERY = 60.0  # seconds between warnings about ignored traceparents


def operation_name(method: str) -> str:
    """The call's gen_ai.operation.name, from its SDK method or its HTTP path."""
    if method in _OPERATIONS:
        return _OPERATIONS[method]
    path = method.split("?")[0].rstrip("/")
    return next((name for ending, name in _PATH_ENDINGS if path.endswith(ending)), method or "call")


def exporting() -> tuple[bool, bool]:
    """(traces, metrics): whether the OTEL_* environment asks for each: the SDK not disabled, its exporter
    OTLP (the default; `none` turns it off, any other is said and off) and an OTLP endpoint for it (its own
    or the generic one)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False, False
    return _exporting("traces"), _exporting("metrics")


def _exporting(signal: str) -> bool:
    variable = f"OTEL_{signal.upper()}_EXPORTER"
    exporter = os.environ.get(variable, "otlp").strip().lower()
    if exporter not in ("otlp", "none"):
        log.warning("%s=%s: isopool exports only otlp (or none); %s are not exported", variable, exporter, signal)
        return False
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    return exporter == "otlp" and any(os.environ.get(name) for name in endpoints)


def from_environment(settings: Settings) -> Tracing | None:
    """The broker's tracing when the environment configures it and the extra is installed, else None."""
    traces, metrics = exporting()
    if not (traces or metrics):
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
    if traces:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # its own thread: the loop never waits
    return Tracing(settings, provider, _meter_provider(resource) if metrics else None)


def _meter_provider(resource: Any) -> Any:
    """The GenAI client metrics' provider: OTLP/HTTP every OTEL_METRIC_EXPORT_INTERVAL (its own thread), with
    the bucket boundaries the conventions ask for (those of both versions: a view matches by name)."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    histograms = {m.name: m.buckets for c in (semconv.V1_41, semconv.V0_1_0) for m in c.metrics() if m.buckets}
    views = [View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(bounds))
             for name, bounds in histograms.items()]  # fmt: skip
    return MeterProvider([PeriodicExportingMetricReader(OTLPMetricExporter())], resource=resource, views=views)


class Tracing:
    def __init__(self, settings: Settings, provider: Any, meters: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._provider, self._meters = provider, meters
        self._tracer = provider.get_tracer("isopool")
        self.names = semconv.from_environment()  # the conventions' version, once
        self._metrics = _Metrics(meters.get_meter("isopool"), self.names) if meters is not None else None
        self._propagator = TraceContextTextMapPropagator()
        self.content = genai.capture_content()  # message content on the spans (opt-in)
        self.ignored_traceparents, self._warned = 0, -_WARN_EVERY
        self._wall = time.time_ns() - time.monotonic_ns()  # the broker's clock is monotonic; spans want wall time
        self._servers = {
            key: (profile.kind, *_server(profile.kind, profile.base_url))
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
        kind, host, port = self._servers.get(req.group, ("", "", None))
        operation = operation_name(req.submit.method)
        model, stream = req.model or req.submit.model, req.submit.stream
        attributes = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": _PROVIDERS.get(kind, kind),
            "gen_ai.request.model": model,
            **({"gen_ai.request.stream": stream} if stream or self.names.stream_when_false else {}),
            "server.address": host,
            **({"server.port": port} if host and port else {}),
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
            span.set_attributes(_response_attributes(spent, self.names.usage))
        first = None if req.first_event_at is None or not req.submit.stream else req.first_event_at - req.sent_at
        if first is not None and self.names.first_chunk_attribute:
            span.set_attribute(self.names.first_chunk_attribute, first)
        if req.output is not None and self.content:
            messages = req.output.messages(spent.finish_reasons if spent is not None else [])
            span.set_attribute("gen_ai.output.messages", _JSON(messages).decode())
        error = error_type(outcome)
        if error:
            span.set_attribute("error.type", error)
            if reason is not None and reason.is_stall:
                span.set_attribute("isopool.stall_reason", error)
            if reason is not None and reason.is_kill:
                span.set_attribute("isopool.kill_reason", error)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end(end_time=self._ns(now))
        if self._metrics is not None:
            self._metrics.record(span.attributes, error, spent, now - req.sent_at, first)

    def attempt_failed(self, req: Any, reason: Any, now: float) -> None:
        """The request's span events for an attempt that failed for `reason`: a stall detected (and how long
        since the attempt's last event, or since it was sent), then its worker killed."""
        if reason.is_stall:
            since = now - (req.last_event_at if req.last_event_at is not None else req.sent_at)
            self.event(req.span, "stall detected", now, reason=reason.value, attempt=req.attempt,
                       seconds_since_last_event=round(since, 3))  # fmt: skip
        if reason.is_kill:
            self.event(req.span, "worker killed", now, reason=reason.value, attempt=req.attempt, stall=reason.is_stall)

    def chunk(self, req: Any, now: float) -> None:
        """A stream's chunk after its first (one EVENT message: what the caller receives at once)."""
        if self._metrics is not None:
            attributes = {key: req.attempt_span.attributes[key] for key in _METRIC_ATTRIBUTES}
            self._metrics.per_chunk(now - req.last_event_at, attributes)

    def event(self, span: Any, name: str, now: float, **attributes: Any) -> None:
        span.add_event(name, attributes=attributes, timestamp=self._ns(now))

    def request_ended(self, span: Any, outcome: str, attempts: int, now: float) -> None:
        span.set_attribute("isopool.attempts", attempts)
        if error := error_type(outcome):
            span.set_attribute("error.type", error)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end(end_time=self._ns(now))

    def close(self) -> None:
        """Export what is left (bounded by the exporters' own timeouts), then stop."""
        self._provider.shutdown()
        if self._meters is not None:
            self._meters.shutdown()


# The span attributes the metrics carry (the conventions' required and recommended ones).
_METRIC_ATTRIBUTES = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "server.address",
                      "server.port")  # fmt: skip


def error_type(outcome: str) -> str:
    """An outcome's error.type, one vocabulary on attempt spans, request spans and metrics ("": none): a Reason
    of the pool's (first_event_timeout, http_429, ...) or an error code of the answer (provider_connection,
    stalled, attempts_exhausted, cancelled, ...), without the stats' "error:" prefix."""
    return "" if outcome == "ok" else outcome.removeprefix("error:")


class _Metrics:
    """The GenAI client metrics, one measurement per provider attempt (the pool's own unit of work), under
    the names of the conventions' version (`names`)."""

    def __init__(self, meter: Any, names: semconv.Conventions) -> None:
        self._names = names
        self._record = {metric.name: _recorder(meter, metric) for metric in names.metrics()}
        self.per_chunk = self._record[names.per_chunk.name]

    def record(self, span: Any, error: str, spent: Spent | None, took: float, first: float | None) -> None:
        attributes = {key: span[key] for key in _METRIC_ATTRIBUTES if key in span}
        if spent is not None and spent.response_model:
            attributes["gen_ai.response.model"] = spent.response_model
        failed = attributes | {"error.type": error} if error else attributes
        operation = self._names.operation(span["gen_ai.operation.name"])
        self._record[operation.duration.name](took, failed)
        if first is not None:
            self._record[self._names.first_chunk.name](first, failed)
        if spent is None:
            return
        for tokens in operation.tokens:  # a count the provider did not report is not recorded (MUST NOT)
            count = getattr(spent, tokens.count)
            if count is not None:
                tagged = (failed if tokens.with_error else attributes) | dict(tokens.attributes)
                self._record[tokens.metric.name](count, tagged)


def _recorder(meter: Any, metric: semconv.Metric) -> Any:
    """How to record a measurement of `metric`: a histogram's record when it has bucket boundaries, else a
    counter's add."""
    if metric.buckets:
        return meter.create_histogram(metric.name, unit=metric.unit, description=metric.description).record
    return meter.create_counter(metric.name, unit=metric.unit, description=metric.description).add


def _response_attributes(spent: Spent, usage: tuple[tuple[str, str, bool], ...]) -> dict[str, Any]:
    """What the provider reported of the attempt's answer, in the GenAI conventions (the input tokens
    count those read from and written to the cache, as the conventions ask); `usage`: the conventions'
    (attribute, Spent's count, set when 0)."""
    found = {
        "gen_ai.response.id": spent.response_id,
        "gen_ai.response.model": spent.response_model,
        "gen_ai.response.finish_reasons": spent.finish_reasons,
    }
    counts = {name: getattr(spent, count) for name, count, _ in usage}
    return {key: value for key, value in found.items() if value} | {
        name: counts[name]
        for name, _, when_zero in usage
        if counts[name] is not None and (when_zero or counts[name])  # not reported: absent, not 0
    }


_JSON = msgspec.json.Encoder().encode


def _content_attributes(payload: bytes) -> dict[str, str]:
    """The call's messages and system instructions (opt-in), as the conventions' JSON strings."""
    messages, system = genai.input_content(payload)
    found = {"gen_ai.input.messages": messages, "gen_ai.system_instructions": system}
    return {key: _JSON(value).decode() for key, value in found.items() if value}


def _server(kind: str, base_url: str | None) -> tuple[str, int | None]:
    """server.address and server.port of a profile's base URL (its scheme's port when it names none)."""
    url = urlsplit(base_url or DEFAULT_BASE_URLS.get(kind, ""))
    return url.hostname or "", url.port or {"https": 443, "http": 80}.get(url.scheme)
