"""The four ways `python -m bench rescue` makes one streaming call, each read to its end as its
caller would take it: the gateway with a plain HTTP client (no retries of its own), the gateway
with the official SDK at max_retries=0, the shim at its SDK's defaults, and the plain SDK straight
at the provider (its defaults, no pool). Every call builds its own client, so calls may run on
threads at once and a call left hanging holds nobody else's connection."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2 as httpx  # the SDKs' own HTTP client: installed with them
import openai

from broker.fake_provider import FAULT_HEADER, LATENCY_HEADER
from broker.shim import anthropic as shim_anthropic
from broker.shim import openai as shim_openai

from .common import base_url

PROFILE_HEADER = "x-isopool-profile"
CLEAN = {FAULT_HEADER: "slow-first:delay=0", LATENCY_HEADER: "ttft=0,gap=0"}  # a header fault beats the model's


@dataclass
class Answer:
    """What one call gave its caller: the text it took, or the error it raised; and who answered."""

    parts: list[str] = field(default_factory=list)
    error: str = ""  # the error's class (SDK paths) or the HTTP status / error event (plain HTTP); "" = none
    stop: str = ""  # the stop or finish reason the stream gave
    model: str = ""  # the answering model, as the answer says
    profile: str = ""  # the answering profile, as the pool says

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(frozen=True)
class Api:
    """One provider API: its requests, its streams' events, its SDK and its shim."""

    kind: str
    model: str
    path: str  # from the root of the server
    sdk: Callable[..., Any]
    shim: Callable[..., Any]
    create: Callable[[Any, dict[str, Any]], Any]  # (SDK client, body) -> the raw response of a stream
    fold: Callable[[Answer, dict[str, Any]], None]  # one event's JSON into the answer
    plain_text: Callable[[dict[str, Any]], str]  # the text of a non-streaming answer

    def base_url(self, root: str) -> str:
        return base_url(root, self.kind)

    def body(self, prompt: str, model: str) -> dict[str, Any]:
        extra = {"max_tokens": 64} if self.kind == "anthropic" else {}
        return {"model": model, **extra, "messages": [{"role": "user", "content": prompt}]}


def _fold_anthropic(answer: Answer, event: dict[str, Any]) -> None:
    kind = event.get("type")
    if kind == "message_start":
        answer.model = event["message"]["model"]
    elif kind == "content_block_delta" and event["delta"].get("type") == "text_delta":
        answer.parts.append(event["delta"]["text"])
    elif kind == "message_delta":
        answer.stop = event["delta"].get("stop_reason") or ""
    elif kind == "error":
        answer.error = event["error"]["type"]


def _fold_openai(answer: Answer, chunk: dict[str, Any]) -> None:
    if "error" in chunk:
        answer.error = (chunk["error"] or {}).get("type") or "error"
        return
    answer.model = chunk.get("model") or answer.model
    for choice in chunk.get("choices") or []:
        answer.parts.append((choice.get("delta") or {}).get("content") or "")
        answer.stop = choice.get("finish_reason") or answer.stop


ANTHROPIC = Api(
    "anthropic", "claude-fake", "/v1/messages", anthropic.Anthropic, shim_anthropic.Anthropic,
    lambda client, body: client.messages.with_raw_response.create(**body, stream=True),
    _fold_anthropic, lambda answer: answer["content"][0]["text"],
)  # fmt: skip
OPENAI = Api(
    "openai", "gpt-fake", "/v1/chat/completions", openai.OpenAI, shim_openai.OpenAI,
    lambda client, body: client.chat.completions.with_raw_response.create(**body, stream=True),
    _fold_openai, lambda answer: answer["choices"][0]["message"]["content"],
)  # fmt: skip


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def via_http(api: Api, root: str, body: dict[str, Any]) -> Answer:
    """A plain HTTP client reading the SSE stream: whatever ends without an error is its answer."""
    with httpx.stream("POST", root + api.path, json={**body, "stream": True}, timeout=60) as response:
        answer = Answer(profile=response.headers.get(PROFILE_HEADER, ""))
        if response.status_code != 200:
            response.read()
            answer.error = f"HTTP {response.status_code}"
            return answer
        try:
            for data in _sse_data(response.iter_lines()):
                if data != "[DONE]":
                    api.fold(answer, json.loads(data))
                if answer.error:
                    break
        except ValueError:
            answer.error = "bad JSON"
        except httpx.HTTPError as exc:
            answer.error = type(exc).__name__
    return answer


def via_sdk(api: Api, client: Any, body: dict[str, Any]) -> Answer:
    """The SDK makes the call and parses the stream; what it raises is the caller's error."""
    answer = Answer()
    with client:
        try:
            raw = api.create(client, body)
            answer.profile = raw.headers.get(PROFILE_HEADER, "")
            for event in raw.parse():
                api.fold(answer, event.model_dump())
        except Exception as exc:  # what the caller's code would see, whatever it is
            answer.error = _name(exc)
            answer.profile = answer.profile or _pool_profile(exc)
    return answer


def _name(exc: Exception) -> str:
    return type(exc).__name__.removeprefix("Anthropic").removeprefix("OpenAI").removesuffix("Error")


def _pool_profile(exc: Exception) -> str:
    """Where a failed call last ran: the shim's `pool_profile` (on the error or on the cause the SDK
    wrapped), or the gateway's header on an error answer."""
    for candidate in (exc, exc.__cause__):
        if profile := getattr(candidate, "pool_profile", ""):
            return profile
    response = getattr(exc, "response", None)
    return response.headers.get(PROFILE_HEADER, "") if response is not None else ""


COLUMNS = ("gateway+HTTP", "gateway+SDK(0)", "shim", "plain SDK")
POOLED = COLUMNS[:3]  # the columns that go through the pool


def caller(column: str, api: Api, pool: Any, provider: str) -> Callable[[dict[str, Any]], Answer]:
    """How `column` makes a call: through `pool` (its gateway or its shim), or straight at `provider`."""
    if column == "gateway+HTTP":
        return lambda body: via_http(api, pool.http_url, body)
    if column == "gateway+SDK(0)":
        return lambda body: via_sdk(api, api.sdk(base_url=api.base_url(pool.http_url), max_retries=0), body)
    if column == "shim":
        return lambda body: via_sdk(api, api.shim(pool=pool, pool_profile="primary"), body)
    return lambda body: via_sdk(api, api.sdk(base_url=api.base_url(provider)), body)


def reference(api: Api, provider: str, body: dict[str, Any]) -> str:
    """The provider's unfaulted answer to `body`: asked again with a harmless header fault, which
    overrides the one in the model's name."""
    response = httpx.post(provider + api.path, json=body, headers=CLEAN, timeout=30)
    response.raise_for_status()
    return api.plain_text(response.json())
