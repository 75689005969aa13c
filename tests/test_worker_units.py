"""Worker pieces without processes: SSE splitting, stream assembly, method resolution, error mapping."""

from __future__ import annotations

import asyncio
import json

import anthropic
import openai
import pytest

from broker.errors import BY_CODE, InternalError, error_for
from broker.fake_provider.content import Reply
from broker.fake_provider.formats import AnthropicMessages, OpenAIChat, OpenAIResponses
from broker.fake_provider.framing import sse as _sse
from broker.protocol import Code, ErrorInfo
from broker.sdklib import library
from worker.assemble import AnthropicMessage, OpenAIChatCompletion, OpenAIResponse
from worker.calls import BadCall, check_kwargs, resolve
from worker.errors import translate
from worker.sse import iter_batches

from .conftest import needs_sdk


async def _chunks(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _collect(data: bytes, size: int) -> list[tuple[str, bytes]]:
    async def collect() -> list[tuple[str, bytes]]:
        return [e async for batch in iter_batches(_chunks(data, size)) for e in batch]

    return asyncio.run(collect())


@pytest.mark.parametrize("size", [1, 7, 4096])
def test_sse_drops_pings_comments_and_done_whatever_the_chunking(size):
    raw = (
        b'event: message_start\ndata: {"a":1}\n\n'
        b'event: ping\ndata: {"type": "ping"}\n\n'
        b": keep-alive\n\n"
        b"\n"
        b'data: {"b":2}\r\n\r\n'
        b"data: [DONE]\n\n"
        b'data: {"after":3}\n\n'
    )
    assert _collect(raw, size) == [("message_start", b'{"a":1}'), ("", b'{"b":2}')]


def test_sse_joins_multi_line_data_and_keeps_a_final_unterminated_event():
    assert _collect(b"event: x\ndata: 1\ndata: 2\n\nevent: y\ndata: 3", 5) == [("x", b"1\n2"), ("y", b"3")]


BODY = {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "fmt, acc, body",
    [
        (AnthropicMessages, AnthropicMessage, BODY),
        (OpenAIChat, OpenAIChatCompletion, {**BODY, "stream_options": {"include_usage": True}}),
        (OpenAIResponses, OpenAIResponse, BODY),
    ],
)
def test_assembled_stream_equals_the_non_streaming_body(fmt, acc, body):
    reply = Reply(body, 30)
    assembler = acc()
    for name, data in fmt.events(reply, body):
        if data != "[DONE]" and name != "ping":
            assembler.feed(name or "", json.dumps(data).encode())
    final = fmt.final(reply, body)
    if fmt is OpenAIChat:  # the streamed message has no refusal field unless one was sent
        final["choices"][0]["message"].pop("refusal")
    assert json.loads(json.dumps(assembler.result(), sort_keys=True)) == json.loads(json.dumps(final, sort_keys=True))


def test_anthropic_tool_use_and_thinking_assemble():
    acc = AnthropicMessage()
    events = [
        {"type": "message_start", "message": {"id": "m", "content": [], "usage": {"input_tokens": 3}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "s"}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"a": '}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "1}"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}},
    ]
    for e in events:
        acc.feed(e["type"], json.dumps(e).encode())
    msg = acc.result()
    assert msg["content"][0] == {"type": "thinking", "thinking": "hm", "signature": "s"}
    assert msg["content"][1]["input"] == {"a": 1}
    assert msg["stop_reason"] == "tool_use" and msg["usage"] == {"input_tokens": 3, "output_tokens": 7}


def test_openai_tool_calls_assemble():
    acc = OpenAIChatCompletion()
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    deltas = [
        {
            "role": "assistant",
            "tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "get", "arguments": ""}}],
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"q":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]},
    ]
    for d in deltas:
        acc.feed("", json.dumps({**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}).encode())
    acc.feed("", json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}).encode())
    choice = acc.result()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["id"] == "call_1" and call["function"] == {"name": "get", "arguments": '{"q":"x"}'}


def test_fake_sse_bytes_are_what_the_splitter_reads():
    assert _sse("x", {"a": 1}) == b'event: x\ndata: {"a":1}\n\n'


@pytest.fixture(scope="module")
def sdk_client():
    return anthropic.AsyncAnthropic(api_key="k")


@pytest.mark.parametrize(
    "method",
    [
        "messages.create",
        "beta.messages.count_tokens",
        pytest.param("messages.batches.list", marks=needs_sdk("messages.batches")),
    ],
)
def test_public_method_paths_resolve(sdk_client, method):
    from anthropic._resource import AsyncAPIResource

    resource, name = resolve(sdk_client, method, AsyncAPIResource)
    assert callable(getattr(resource, name))


@pytest.mark.parametrize(
    "method",
    ["messages", "_client.get", "messages._post", "api_key.upper", "with_options.x", "messages.with_raw_response"],
)
def test_private_or_non_resource_paths_are_refused(sdk_client, method):
    from anthropic._resource import AsyncAPIResource

    with pytest.raises(BadCall):
        resolve(sdk_client, method, AsyncAPIResource)


@pytest.mark.parametrize(("method", "missing"), [("messages.not_yet", "messages.not_yet"), ("nope.create", "nope")])
def test_a_path_the_sdk_lacks_is_refused_naming_the_sdk_release(sdk_client, method, missing):
    """What an older SDK in the pool lacks (anthropic 0.40's `messages.count_tokens`) is said to be missing
    from that release, not called a private path."""
    from anthropic._resource import AsyncAPIResource

    with pytest.raises(BadCall, match=rf"the pool's anthropic {anthropic.__version__} has no '{missing}'"):
        resolve(sdk_client, method, AsyncAPIResource)


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer x"}, {"x-api-key": "k"}, {"api-key": "k"}])
def test_credential_headers_are_refused(headers):
    with pytest.raises(BadCall):
        check_kwargs({"extra_headers": headers})
    check_kwargs({"extra_headers": {"x-isopool-fault": "reset"}})


# What a worker's SDK raises is built on that SDK's HTTP library (httpx for anthropic 0.x and openai < 3).
HTTP = library("anthropic")


def _status_error(sdk, status: int):
    request = library(sdk.__name__).Request("POST", "http://x/v1/messages")
    response = library(sdk.__name__).Response(status, request=request, json={"error": {"type": "t", "message": "m"}})
    return sdk.APIStatusError("m", response=response, body={"error": {"type": "t"}})


@pytest.mark.parametrize(
    "exc, code",
    [
        (_status_error(anthropic, 529), Code.PROVIDER_STATUS),
        (_status_error(openai, 429), Code.PROVIDER_STATUS),
        (anthropic.APITimeoutError(HTTP.Request("GET", "http://x")), Code.PROVIDER_TIMEOUT),
        (openai.APIConnectionError(request=library("openai").Request("GET", "http://x")), Code.PROVIDER_CONNECTION),
        (HTTP.ReadError("reset"), Code.PROVIDER_CONNECTION),
        (HTTP.ReadTimeout("slow"), Code.PROVIDER_TIMEOUT),
        (BadCall("no"), Code.BAD_REQUEST),
        (TypeError("unexpected keyword"), Code.BAD_REQUEST),
        (openai.OpenAIError("api_key must be set"), Code.CONFIG),
        (RuntimeError("bug"), Code.INTERNAL),
    ],
)
def test_worker_translates_exceptions(exc, code):
    info = translate(exc)
    assert info.code == code
    if code == Code.PROVIDER_STATUS:
        assert info.status == exc.status_code and json.loads(info.body)["error"]["type"] == "t"


def test_every_error_code_has_an_exception_class():
    assert set(BY_CODE) == set(Code)
    for code, cls in BY_CODE.items():
        assert isinstance(error_for(ErrorInfo(code, "m")), cls)
    assert isinstance(error_for(ErrorInfo("from_the_future", "m")), InternalError)


def test_timed_calls_reach_a_proxy_the_way_the_sdks_do(monkeypatch):
    """The load test's aiohttp transport reads HTTP(S)_PROXY and NO_PROXY as httpx does (aiohttp's own
    trust_env would also look up ~/.netrc in a thread at every request)."""
    from worker.timing import proxy_for

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")
    proxy_for.cache_clear()
    try:
        assert proxy_for("https", "api.example.com") == "http://proxy.example:3128"
        assert proxy_for("https", "gpu.internal") is None
        assert proxy_for("https", "localhost") is None
        assert proxy_for("http", "api.example.com") is None  # no HTTP_PROXY
    finally:
        proxy_for.cache_clear()
