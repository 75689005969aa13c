"""The two batch formats people already have, in and out.

In: OpenAI Batch input lines `{"custom_id", "method": "POST", "url": "/v1/...", "body"}` and
Anthropic Message Batches requests `{"custom_id", "params"}`. Out: the matching
provider's batch *result* lines, so tooling that reads provider results reads ours.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterator
from typing import Any, Literal

import msgspec

from ..protocol import Usage

Format = Literal["openai", "anthropic"]

# OpenAI batch URL -> SDK method path run in the worker
OPENAI_URLS = {
    "/v1/chat/completions": "chat.completions.create",
    "/v1/responses": "responses.create",
    "/v1/embeddings": "embeddings.create",
}
# Anthropic's error type per isopool error code, as the gateway answers them (broker/http/gateway.py `_status`)
_ANTHROPIC_TYPES = {
    "invalid": "invalid_request_error",
    "bad_request": "invalid_request_error",
    "stalled": "timeout_error",
    "attempts_exhausted": "timeout_error",
    "deadline": "timeout_error",
    "rate_limited": "rate_limit_error",
    "saturated": "overloaded_error",
    "shutting_down": "overloaded_error",
}
_DEC = msgspec.json.Decoder()
_CANONICAL = msgspec.json.Encoder(order="sorted")


class Item(msgspec.Struct, frozen=True):
    """One request of the batch: where it came from and what to run."""

    line: int
    custom_id: str
    kind: Format
    method: str  # SDK method path
    params: dict[str, Any]


class Invalid(msgspec.Struct, frozen=True):
    line: int
    custom_id: str | None
    reason: str


def numbered_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line; a UTF-8 byte order mark (as editors on Windows save
    files) is no part of the first."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():
                yield number, raw


def duplicate(line: int, custom_id: str, first: int) -> Invalid:
    return Invalid(line, None, f"duplicate custom_id {custom_id!r} (first on line {first})")


def detect(first: dict[str, Any]) -> Format | None:
    if "params" in first:
        return "anthropic"
    if "url" in first or "body" in first:
        return "openai"
    return None


def parse_line(number: int, raw: bytes, fmt: Format | None) -> tuple[Item | Invalid, Format | None]:
    """Parse one input line; `fmt` is the file's format once known (forced or detected)."""
    try:
        data = _DEC.decode(raw)
    except msgspec.DecodeError as exc:
        return Invalid(number, None, f"malformed JSON: {exc}"), fmt
    if not isinstance(data, dict):
        return Invalid(number, None, "a line must be a JSON object"), fmt
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Invalid(number, None, "missing custom_id (a non-empty string)"), fmt
    fmt = fmt or detect(data)
    if fmt == "anthropic":
        params = data.get("params")
        if not isinstance(params, dict):
            return Invalid(number, custom_id, "missing params (an object of Messages API parameters)"), fmt
        if params.get("stream"):
            return Invalid(number, custom_id, "params.stream is not allowed in a batch"), fmt
        return Item(number, custom_id, "anthropic", "messages.create", params), fmt
    if fmt == "openai":
        url, body = data.get("url"), data.get("body")
        if data.get("method", "POST") != "POST":
            return Invalid(number, custom_id, f"method {data.get('method')!r}: only POST is supported"), fmt
        if url not in OPENAI_URLS:
            return Invalid(number, custom_id, f"unknown url {url!r}; supported: {', '.join(OPENAI_URLS)}"), fmt
        if not isinstance(body, dict):
            return Invalid(number, custom_id, "missing body (an object of API parameters)"), fmt
        if body.get("stream"):
            return Invalid(number, custom_id, "body.stream is not allowed in a batch"), fmt
        return Item(number, custom_id, "openai", OPENAI_URLS[url], body), fmt
    return Invalid(number, custom_id, "neither an OpenAI batch line (url, body) nor an Anthropic one (params)"), fmt


def fingerprint(line: Item | Invalid) -> str:
    """A short hash of what the line asks (its API method and parameters, keys sorted, so that a
    reformatted file is the same input; an invalid line: why it is invalid): the ledger compares it
    with what an existing result answered."""
    return digest((line.method, line.params) if isinstance(line, Item) else ("invalid", line.reason))


def digest(value: Any) -> str:
    """16 hex of the sha256 of `value` as JSON with sorted keys: the same data hashes the same however written."""
    return hashlib.sha256(_CANONICAL.encode(value)).hexdigest()[:16]


def _request_id(headers: list[tuple[str, str]]) -> str | None:
    for key, value in headers:
        if key.lower() in ("x-request-id", "request-id"):
            return value
    return None


def succeeded(item: Item, status: int, headers: list[tuple[str, str]], body: Any) -> dict[str, Any]:
    if item.kind == "anthropic":
        return {"custom_id": item.custom_id, "result": {"type": "succeeded", "message": body}}
    return _openai_line(item, {"status_code": status, "request_id": _request_id(headers), "body": body}, None)


def provider_failed(item: Item, status: int, headers: list[tuple[str, str]], body: Any) -> dict[str, Any]:
    """The provider answered with an HTTP error: its body, as the provider's batch would show it."""
    if item.kind == "anthropic":
        error = body if isinstance(body, dict) and body.get("type") == "error" else _anthropic_error("api_error", body)
        return {"custom_id": item.custom_id, "result": {"type": "errored", "error": error}}
    return _openai_line(item, {"status_code": status, "request_id": _request_id(headers), "body": body}, None)


def failed(item: Item | Invalid, code: str, message: str, kind: Format) -> dict[str, Any]:
    """No provider answer (stalls exhausted, invalid line, ...): the error says what happened, its code once.
    Anthropic's error type as the gateway answers the same error (`api_error` is a retryable server error:
    never a request the pool refused); OpenAI's batch error carries the code itself."""
    custom_id = item.custom_id or f"line-{item.line}"
    if kind == "anthropic":
        error = _anthropic_error(_ANTHROPIC_TYPES.get(code, "api_error"), f"[{code}] {message}")
        return {"custom_id": custom_id, "result": {"type": "errored", "error": error}}
    return {
        "id": _batch_request_id(custom_id),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def _anthropic_error(kind: str, message: Any) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": str(message)}}


def _openai_line(item: Item, response: dict[str, Any], error: Any) -> dict[str, Any]:
    return {"id": _batch_request_id(item.custom_id), "custom_id": item.custom_id, "response": response, "error": error}


def _batch_request_id(custom_id: str) -> str:
    return "batch_req_" + hashlib.sha256(custom_id.encode()).hexdigest()[:24]


def tokens_of(record: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """(input, output, cache read, cache write) tokens a succeeded result's answer reports (input counts
    the cached ones too), or None."""
    answer = record["result"].get("message") if "result" in record else (record.get("response") or {}).get("body")
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return None
    try:
        read = msgspec.convert(usage, Usage)
    except msgspec.ValidationError:
        return None
    return max(read.input, 0), max(read.output, 0), max(read.cached, 0), max(read.cache_creation, 0)


def is_ok(record: dict[str, Any]) -> bool:
    if "result" in record:
        return record["result"]["type"] == "succeeded"
    response = record.get("response")
    return bool(response) and 200 <= response["status_code"] < 300


def error_kind(record: dict[str, Any]) -> str:
    if "result" in record:  # Anthropic's nested error object, or a job's exception
        error = record["result"].get("error") or {}
        return (error.get("error") or error).get("type", "error")
    if record.get("error"):
        return str(record["error"].get("code"))
    return f"http {record['response']['status_code']}"
