"""The caller's current trace context, for the pool's spans to go under (issue 22).

Read only where the application already uses OpenTelemetry (its API is imported): a caller
without it pays one dictionary lookup per call and the pool never imports it for them."""

from __future__ import annotations

import sys


def current() -> str:
    """The current span as a W3C `traceparent`, or "" (no OpenTelemetry in use, or no span)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return ""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
