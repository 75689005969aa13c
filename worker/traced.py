"""The attempt's trace context on the provider request: the broker names the attempt's span in the
RUN header (`traceparent`), and the provider's own tracing, if any, continues the caller's trace."""

from __future__ import annotations

import msgspec

from broker.protocol import Call, HttpCall


def traced(call: Call | HttpCall, traceparent: str) -> Call | HttpCall:
    """`call` sending `traceparent` (in place of any the caller sent: the attempt's span is its child)."""
    if isinstance(call, Call):
        headers = {k: v for k, v in (call.kwargs.get("extra_headers") or {}).items() if k.lower() != "traceparent"}
        return msgspec.structs.replace(
            call, kwargs={**call.kwargs, "extra_headers": {**headers, "traceparent": traceparent}}
        )
    headers = [(k, v) for k, v in call.headers if k.lower() != "traceparent"]
    return msgspec.structs.replace(call, headers=[*headers, ("traceparent", traceparent)])
