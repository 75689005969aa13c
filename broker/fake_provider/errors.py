"""The fake provider's error answers, in the shapes the real APIs send them.

The bodies are copied from answers seen in the wild, so that a client's handling of each error
(what it retries, where it falls back, what it shows) is tested against what it will meet:
- Anthropic: `{"type": "error", "error": {"type": ..., "message": ...}}`; a prompt over the context
  window is a 400 `invalid_request_error` "prompt is too long: N tokens > M maximum".
- OpenAI: `{"error": {"message", "type", "param", "code"}}`; over the context window a 400 with code
  `context_length_exceeded` (Chat Completions: "This model's maximum context length is ...", param
  `messages`; Responses: "Your input exceeds the context window of this model ...", param `input`).
  A content filter is Azure OpenAI's 400 with code `content_filter` and its `innererror`; OpenAI's
  own API refuses a flagged prompt to reasoning models with code `invalid_prompt` instead.
- Anthropic has no content-filter 400: a refusal is a normal answer with `stop_reason: refusal`
  (see `formats.py`).
- The clouds: Bedrock answers `{"message": ...}` with the error's name in `x-amzn-ErrorType` (and has
  no 529: overloaded is its 503 ServiceUnavailableException); Vertex answers Anthropic's shapes, but a
  quota 429 is Google's JSON array `[{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}]`;
  Azure answers OpenAI's.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from ..config import FAMILIES  # a dialect (a profile kind) -> the API whose error shapes it otherwise keeps
from .faults import Fault

_ENC = msgspec.json.Encoder()
_TYPES = {400: "invalid_request_error", 408: "api_error", 409: "api_error", 429: "rate_limit_error",
          500: "api_error", 503: "api_error", 529: "overloaded_error"}  # fmt: skip
_CONTEXT = {"anthropic": 200_000, "openai": 128_000}  # the usual context windows, when `limit` is not given
_BEDROCK = {400: "ValidationException", 403: "AccessDeniedException", 429: "ThrottlingException",
            500: "InternalServerException", 503: "ServiceUnavailableException"}  # fmt: skip
_AZURE_FILTER = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please "
    "modify your prompt and retry. To learn more about our content filtering policies please read our "
    "documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
)
_SEVERITIES = {"hate": "safe", "self_harm": "safe", "sexual": "safe", "violence": "medium"}


def error_response(dialect: str, status: int, kind: str | None, message: str, headers: dict | None = None,
                   fields: dict[str, Any] | None = None) -> web.Response:  # fmt: skip
    """An error answer; `fields` (OpenAI's `code`, `param`, ...) replace the defaults."""
    if dialect == "bedrock":
        status = 503 if status == 529 else status
        # Bedrock's error names are capitalised; an Anthropic or OpenAI error type gives way to the status's
        name = kind if kind and kind[:1].isupper() else _BEDROCK.get(status, "InternalServerException")
        headers = {
            **(headers or {}),
            "x-amzn-ErrorType": f"{name}:http://internal.amazon.com/coral/com.amazon.bedrock/",
        }
        return web.Response(status=status, body=_ENC.encode({"message": message}), content_type="application/json",
                            headers=headers)  # fmt: skip
    if dialect == "vertex" and status == 429:
        quota = "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model"
        body = [{"error": {"code": 429, "message": f"{quota} ({message})", "status": "RESOURCE_EXHAUSTED"}}]
        return web.Response(status=status, body=_ENC.encode(body), content_type="application/json", headers=headers)
    if FAMILIES[dialect] == "anthropic":
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"type": kind, "message": message, "code": kind, "param": None, **(fields or {})}}
    return web.Response(status=status, body=_ENC.encode(body), content_type="application/json", headers=headers)


def fault_response(dialect: str, path: str, fault: Fault, input_tokens: int) -> web.Response | None:
    """The error answer `fault` makes instead of an answer, or None for a fault that is not one."""
    if (status := fault.http_status) is not None:
        return error_response(dialect, status, _TYPES[status], f"injected {fault.kind}", _retry_headers(fault))
    if fault.kind == "context-length":
        limit = fault.limit or _CONTEXT[FAMILIES[dialect]]
        return _context_length(dialect, path, limit + input_tokens, limit)
    if fault.kind == "content-filter" and FAMILIES[dialect] == "openai":
        return _content_filter()
    return None


def _retry_headers(fault: Fault) -> dict[str, str]:
    headers = {}
    if fault.retry_after is not None:
        headers["retry-after"] = f"{fault.retry_after:g}"
    if fault.retry_after_ms is not None:
        headers["retry-after-ms"] = str(fault.retry_after_ms)
    if fault.should_retry:
        headers["x-should-retry"] = fault.should_retry
    return headers


def _context_length(dialect: str, path: str, tokens: int, limit: int) -> web.Response:
    if FAMILIES[dialect] == "anthropic":
        message = f"prompt is too long: {tokens} tokens > {limit} maximum"
        return error_response(dialect, 400, "invalid_request_error", message)
    if path.endswith("/responses"):
        message = "Your input exceeds the context window of this model. Please adjust your input and try again."
        param = "input"
    else:
        message = (f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
                   f"{tokens} tokens. Please reduce the length of the messages.")  # fmt: skip
        param = "messages"
    fields = {"code": "context_length_exceeded", "param": param}
    return error_response(dialect, 400, "invalid_request_error", message, fields=fields)


def _content_filter() -> web.Response:
    result = {name: {"filtered": severity != "safe", "severity": severity} for name, severity in _SEVERITIES.items()}
    result["jailbreak"] = {"filtered": False, "detected": False}
    inner = {"code": "ResponsibleAIPolicyViolation", "content_filter_result": result}
    fields = {"code": "content_filter", "param": "prompt", "status": 400, "innererror": inner}
    return error_response("openai", 400, None, _AZURE_FILTER, fields=fields)


def prefill_rejected() -> web.Response:
    """What a model without assistant prefill answers a conversation that ends with an assistant turn."""
    message = "This model does not support assistant message prefill. The conversation must end with a user message."
    return error_response("anthropic", 400, "invalid_request_error", message)


def trailing_whitespace() -> web.Response:
    """What every Anthropic model answers a prefill that ends with whitespace."""
    message = "messages: final assistant content cannot end with trailing whitespace"
    return error_response("anthropic", 400, "invalid_request_error", message)
