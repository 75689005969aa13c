"""OpenTelemetry traces (issue 22), received by a real OTLP/HTTP receiver in the test: what the
broker's exporter sends is decoded with the OpenTelemetry protobufs."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx2 as httpx
import pytest

from broker import Pool, StreamStalled
from broker.server.genai import CONTENT_CHARS

from .conftest import TEST_SETTINGS, anthropic_args, fault, openai_args, wait_for

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped pool started once, on one worker

trace_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2", reason="isopool[otel]")
metrics_pb2 = pytest.importorskip("opentelemetry.proto.collector.metrics.v1.metrics_service_pb2")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="isopool[otel]")


class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP receiver: keeps every span and metric it is sent, and the raw bodies."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[Any] = []
        self.metrics: list[Any] = []
        self.metric_exports = 0
        self.raw = b""
        self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        traces = self.path == "/v1/traces"
        request = trace_pb2.ExportTraceServiceRequest() if traces else metrics_pb2.ExportMetricsServiceRequest()
        request.ParseFromString(body)
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.raw += body  # type: ignore[attr-defined]
            for resource in request.resource_spans if traces else request.resource_metrics:
                for scope in resource.scope_spans if traces else resource.scope_metrics:
                    found = self.server.spans if traces else self.server.metrics  # type: ignore[attr-defined]
                    found.extend(scope.spans if traces else scope.metrics)
            self.server.metric_exports += not traces  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()
        answer = trace_pb2.ExportTraceServiceResponse() if traces else metrics_pb2.ExportMetricsServiceResponse()
        self.wfile.write(answer.SerializeToString())

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def receiving(env: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A receiver, and the environment that points a pool started meanwhile at it."""
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver(monkeypatch) -> Iterator[Receiver]:
    with receiving(monkeypatch) as server:
        yield server


def attrs(span: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


def traced_pool(fake: Any, openai: bool = False, **settings: Any) -> Pool:
    """A pool that finds a stall within a second; with `openai`, an OpenAI profile too."""
    profiles = {"anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 2}}
    if openai:
        profiles["openai"] = {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1}
    return Pool(profiles=profiles, **{**TEST_SETTINGS, "first_event_timeout": 1.0, "stale_timeout": 1.0, **settings})


CALM_MODELS = ("fake-with-params", "gpt-unreported")


@pytest.fixture(scope="module")
def shared(fake: Any) -> Iterator[tuple[Receiver, Pool]]:
    """One pool and its receiver for the tests that need no OTEL_* variable of their own: each calls a model
    of its own and reads only that model's spans and metric points (`received`, `exported`)."""
    with pytest.MonkeyPatch.context() as env, receiving(env) as server:
        env.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
        calm = {name: TEST_SETTINGS[name] for name in ("first_event_timeout", "stale_timeout")}
        models = dict.fromkeys(CALM_MODELS, calm)  # the tests that cause no stall: the suite's margins, not 1 s
        pool = traced_pool(fake, openai=True, http="127.0.0.1:0", models=models).start()
        env.undo()  # read at the broker's start; the module's other tests start pools of their own
        with pool:
            yield server, pool


def received(receiver: Receiver, model: str, requests: int) -> list[Any]:
    """The spans of the calls for `model`, once its `requests` request spans are in: a request's span ends after
    its attempts' spans (and after their metrics are recorded), so theirs were sent with it or before."""

    def found() -> list[Any] | None:
        with receiver.lock:
            spans = [s for s in receiver.spans if attrs(s).get("gen_ai.request.model") == model]
        return spans if sum(s.name == "isopool.request" for s in spans) >= requests else None

    return wait_for(found, what=f"the spans of {requests} requests for {model}")


def exported(receiver: Receiver, model: str) -> dict[str, list[Any]]:
    """Each histogram's data points for `model`, from an export of every measurement made so far (the reader
    sends one export at a time: the second to come in from now was collected after the first came in)."""
    seen = receiver.metric_exports
    wait_for(lambda: receiver.metric_exports >= seen + 2, what="two more metric exports")
    with receiver.lock:
        latest = {metric.name: metric for metric in receiver.metrics}  # cumulative: each export holds every one
    return {name: [p for p in metric.histogram.data_points if attrs(p).get("gen_ai.request.model") == model]
            for name, metric in latest.items()}  # fmt: skip


def test_a_stall_retried_before_output_is_followed_from_the_callers_span_to_the_provider(fake, shared,
                                                                                          own_processes):  # fmt: skip
    (receiver, pool), model = shared, "claude-traced"
    app = sdk_trace.TracerProvider().get_tracer("app")
    with pool.client() as client:
        with app.start_as_current_span("the application's step") as step:
            stalled = client.submit("anthropic", "messages.create", stream=True,
                                    **anthropic_args("traced", model=model),
                                    **fault("stall-first:interval=0.05"))  # fmt: skip
            assert list(stalled)
            clean = client.request("anthropic", "messages.create", **anthropic_args("traced, clean", model=model))
    rid = dict(clean.headers)["request-id"]
    sent = httpx.get(f"{fake.url}/_isopool/requests/{rid}").json()  # the headers the provider got
    spans = received(receiver, model, 2)
    requests = [s for s in spans if s.name == "isopool.request"]
    attempts = [s for s in spans if s.kind == s.SPAN_KIND_CLIENT]
    trace_id, step_id = step.get_span_context().trace_id.to_bytes(16, "big"), step.get_span_context().span_id
    assert len(requests) == 2 and all(s.trace_id == trace_id for s in spans)
    assert all(s.parent_span_id == step_id.to_bytes(8, "big") for s in requests)  # under the caller's span
    first, second, third = sorted(attempts, key=lambda s: s.start_time_unix_nano)
    assert first.parent_span_id == second.parent_span_id == requests[0].span_id  # both attempts of the stalled call
    assert first.name == f"chat {model}" and attrs(first).items() >= {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic", "gen_ai.request.model": model,
        "server.address": "127.0.0.1", "server.port": urlsplit(fake.url).port, "isopool.attempt": 1,
        "isopool.retried": False, "error.type": "first_event_timeout", "isopool.stall_reason": "first_event_timeout",
        "isopool.kill_reason": "first_event_timeout",
    }.items()  # fmt: skip
    assert first.status.code == first.status.STATUS_CODE_ERROR
    assert (
        attrs(second)["isopool.attempt"] == 2 and attrs(second)["isopool.retried"] and "error.type" not in attrs(second)
    )
    events = {e.name: attrs(e) for e in requests[0].events}
    assert list(events) == ["stall detected", "worker killed", "retry queued"]
    stall = events["stall detected"]
    assert stall["reason"] == "first_event_timeout" and 0.9 < stall["seconds_since_last_event"] < 5  # no event yet
    assert sent["traceparent"].startswith(f"00-{trace_id.hex()}-{third.span_id.hex()}-")  # the attempt's span
    assert os.environ["ANTHROPIC_API_KEY"].encode() not in receiver.raw
    assert b"traced, clean" not in receiver.raw  # no message content without the opt-in (the last test: with it)
    assert not any(a.key in ("gen_ai.input.messages", "gen_ai.output.messages") for s in spans for a in s.attributes)


def test_a_stall_after_output_and_a_429_are_errors_of_their_attempts(shared, own_processes):
    (receiver, pool), model = shared, "claude-failing"
    with pool.client() as client:
        with pytest.raises(StreamStalled):
            list(client.submit("anthropic", "messages.create", stream=True,
                               **anthropic_args("traced, seen stall", model=model),
                               **fault("stall-ping:after=3,interval=0.05")))  # fmt: skip
        client.request("anthropic", "messages.create", **anthropic_args("traced, 429", model=model),
                       **fault("http-429"))  # fmt: skip
    spans = sorted(received(receiver, model, 2), key=lambda s: s.start_time_unix_nano)
    requests = [s for s in spans if s.name == "isopool.request"]
    attempts = [s for s in spans if s.kind == s.SPAN_KIND_CLIENT]
    assert [attrs(s).get("error.type") for s in requests] == ["stalled", None]  # no "error:" prefix
    assert [attrs(s).get("error.type") for s in attempts] == ["stale_timeout", "http_429", None]
    assert attrs(attempts[0])["isopool.delivered_events"] >= 1 and "isopool.kill_reason" in attrs(attempts[0])
    assert "isopool.kill_reason" not in attrs(attempts[1])  # the provider answered: no worker was killed
    stalled, throttled, answered = (attrs(s) for s in attempts)
    assert stalled["gen_ai.usage.output_tokens"] == 1 and stalled["gen_ai.usage.input_tokens"] > 0  # message_start's
    assert stalled["gen_ai.response.id"].startswith("msg_") and stalled["gen_ai.response.model"] == model
    assert "gen_ai.usage.input_tokens" not in throttled and "gen_ai.response.id" not in throttled  # none reported
    assert answered["gen_ai.usage.output_tokens"] > 1 and "gen_ai.usage.cache_read.input_tokens" in answered
    finish = next(a for a in attempts[2].attributes if a.key == "gen_ai.response.finish_reasons")
    assert [v.string_value for v in finish.value.array_value.values] == ["end_turn"]


def test_the_gateway_puts_its_callers_traceparent_above_the_pools_spans(shared, own_processes):
    (receiver, pool), model = shared, "claude-relayed"
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    answer = httpx.post(f"{pool.http_url}/v1/messages", json=anthropic_args("traced through the gateway", model=model),
                        headers={"traceparent": f"00-{trace_id}-{parent}-01"}, timeout=30)  # fmt: skip
    assert answer.status_code == 200
    httpx.post(f"{pool.http_url}/v1/messages", json=anthropic_args("a forged traceparent", model=model),
               headers={"traceparent": "00-zz-not-one"}, timeout=30)  # fmt: skip
    requests = [s for s in received(receiver, model, 2) if s.name == "isopool.request"]
    assert len(requests) == 2
    assert requests[0].trace_id.hex() == trace_id and requests[0].parent_span_id.hex() == parent
    assert requests[1].trace_id.hex() != trace_id and not requests[1].parent_span_id  # a trace of its own


def test_the_genai_client_metrics_count_each_attempt_with_its_outcome_and_tokens(shared, own_processes):
    (receiver, pool), model = shared, "claude-metered"
    with pool.client() as client:
        assert list(client.submit("anthropic", "messages.create", stream=True, **anthropic_args("metered", model=model),
                                  **fault("stall-first:interval=0.05")))  # fmt: skip
        client.request("anthropic", "messages.create", **anthropic_args("metered, plain", model=model))
        assert list(client.submit("anthropic", "messages.create", stream=True,
                                  **anthropic_args("metered, dripped", model=model),
                                  **fault("drip:gap=0.03")))  # fmt: skip
    received(receiver, model, 3)
    points = exported(receiver, model)
    duration = {attrs(p).get("error.type"): p.count for p in points["gen_ai.client.operation.duration"]}
    assert duration == {"first_event_timeout": 1, None: 3}  # the stall, its retry, the plain call, the drip
    first_chunk = points["gen_ai.client.operation.time_to_first_chunk"]
    assert sum(p.count for p in first_chunk) == 2 and 0 < first_chunk[0].sum < 2  # the streams' answered attempts
    (per_chunk,) = points["gen_ai.client.operation.time_per_output_chunk"]  # each chunk after a stream's first
    assert per_chunk.count >= 6 and 0.02 < per_chunk.sum / per_chunk.count < 0.2  # the drip's 0.03 s apart
    assert attrs(per_chunk)["gen_ai.operation.name"] == "chat"
    tokens = {attrs(p)["gen_ai.token.type"]: p for p in points["gen_ai.client.token.usage"]}
    assert tokens["input"].count == tokens["output"].count == 3 and tokens["output"].sum > 0
    assert all(attrs(p)["gen_ai.provider.name"] == "anthropic" for p in points["gen_ai.client.operation.duration"])


def content_pool(fake: Any) -> Pool:
    profiles = {
        "anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 1},
        "openai": {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1},
    }
    return Pool(profiles=profiles, **TEST_SETTINGS)


def test_the_attempt_span_carries_the_calls_parameters_on_each_api(shared, own_processes):
    (receiver, pool), model = shared, "fake-with-params"
    anthropic_params = {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop_sequences": ["END"]}
    chat_params = {"max_completion_tokens": 50, "frequency_penalty": 0.5, "presence_penalty": -0.5, "seed": 7,
                   "n": 2, "stop": "STOP", "response_format": {"type": "json_object"}}  # fmt: skip
    responses_params = {"max_output_tokens": 40, "temperature": 1, "text": {"format": {"type": "text"}}}
    with pool.client() as client:
        args = anthropic_args("params", model=model, **anthropic_params)
        answer = httpx.post(f"{pool.http_url}/v1/messages", json=args, timeout=30)  # through the gateway: a body
        assert answer.status_code == 200
        kwargs = openai_args("params", model=model, **chat_params)
        client.request("openai", "chat.completions.create", **kwargs)  # SDK kwargs
        client.request("openai", "responses.create", model=model, input="params", **responses_params)
    spans = received(receiver, model, 3)
    by_model = {attrs(s)["gen_ai.operation.name"] + str(attrs(s).get("gen_ai.request.max_tokens")): attrs(s)
                for s in spans if s.kind == s.SPAN_KIND_CLIENT}  # fmt: skip
    messages, chat, responses = by_model["chat64"], by_model["chat50"], by_model["chat40"]
    assert messages.items() >= {"gen_ai.request.temperature": 0.5, "gen_ai.request.top_p": 0.9,
                                "gen_ai.request.top_k": 40}.items()  # fmt: skip
    assert chat.items() >= {"gen_ai.request.frequency_penalty": 0.5, "gen_ai.request.presence_penalty": -0.5,
                            "gen_ai.request.seed": 7, "gen_ai.request.choice.count": 2,
                            "gen_ai.output.type": "json"}.items()  # fmt: skip
    assert responses["gen_ai.request.temperature"] == 1.0 and responses["gen_ai.output.type"] == "text"
    assert "gen_ai.request.top_k" not in chat and "gen_ai.request.seed" not in messages  # only those set
    stops = {name: [v.string_value for v in s.array_value.values] for name, s in
             ((attrs(span).get("gen_ai.request.max_tokens"), a.value) for span in spans
              for a in span.attributes if a.key == "gen_ai.request.stop_sequences")}  # fmt: skip
    assert stops == {64: ["END"], 50: ["STOP"]}


SECRET = "a prompt only an opted-in trace may carry"


def test_message_content_is_on_the_spans_when_opted_in_and_bounded(fake, receiver, monkeypatch, own_processes):
    """(Without the switch, no content: the first test of this file.)"""
    system = [{"type": "text", "text": "you are terse"}]
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    with content_pool(fake) as pool, pool.client() as client:
        events = list(client.submit("anthropic", "messages.create", stream=True,
                                    **anthropic_args(SECRET, system=system)))  # fmt: skip
        answer = client.request("openai", "chat.completions.create", **openai_args("x" * 100_000))
        said = list(client.submit("openai", "responses.create", stream=True, model="gpt-fake", input="hi",
                                  instructions="be kind"))  # fmt: skip
    text = "".join(e.json()["delta"]["text"] for e in events if e.name == "content_block_delta")
    spans = {(a["gen_ai.provider.name"], "gen_ai.system_instructions" in a): a
             for a in (attrs(s) for s in receiver.spans if s.kind == s.SPAN_KIND_CLIENT)}  # fmt: skip
    streamed, whole, responses = spans["anthropic", True], spans["openai", False], spans["openai", True]
    assert json.loads(streamed["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": SECRET}]}
    ]
    assert json.loads(streamed["gen_ai.system_instructions"]) == [{"type": "text", "content": "you are terse"}]
    assert json.loads(streamed["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": text}], "finish_reason": "end_turn"}
    ]
    assert text and json.loads(answer.body)["choices"][0]["message"]["content"] in whole["gen_ai.output.messages"]
    assert CONTENT_CHARS < len(whole["gen_ai.input.messages"]) < CONTENT_CHARS + 200  # 100 000 characters sent
    reply = "".join(e.json()["delta"] for e in said if e.name == "response.output_text.delta")
    assert reply and json.loads(responses["gen_ai.output.messages"])[0]["parts"][0]["content"] == reply
    assert json.loads(responses["gen_ai.system_instructions"]) == [{"type": "text", "content": "be kind"}]


def test_a_traceparent_past_the_w3c_limit_is_counted_and_said_once_not_at_each_request(caplog):
    """Found by the session-27 review: a raw caller's traceparent of over 512 characters made the
    propagator log a warning at every request."""
    from types import SimpleNamespace

    from broker.config import load_settings
    from broker.server.tracing import Tracing

    tracing = Tracing(load_settings(None), sdk_trace.TracerProvider())
    submit = SimpleNamespace(traceparent="00-" + "a" * 600, model="m", stream=False)
    with caplog.at_level("WARNING"):
        spans = [tracing.request_started(SimpleNamespace(submit=submit, profile="p", payload=b""), float(n))
                 for n in range(50)]  # fmt: skip
    assert tracing.ignored_traceparents == 50 and all(span.parent is None for span in spans)  # traces of their own
    assert [r.getMessage() for r in caplog.records] == [
        "ignored a traceparent of 603 characters (over 512; 1 so far): those requests start traces of their own"
    ]


def test_openai_calls_are_chat_and_a_usage_the_provider_did_not_report_is_absent_not_zero(fake, shared,
                                                                                          own_processes):  # fmt: skip
    """Found by verify22: OpenAI calls were named by their path, and a Chat stream without include_usage
    carried (and metered) 0 tokens, OpenAI ones a cache write of 0."""
    (receiver, pool), model = shared, "gpt-unreported"
    with pool.client() as client:
        assert list(client.submit("openai", "chat.completions.create", stream=True,
                                  **openai_args("no usage asked", model=model)))  # fmt: skip
        answer = httpx.post(f"{pool.http_url}/v1/chat/completions", json=openai_args("relayed", model=model),
                            timeout=30)  # fmt: skip
        assert answer.status_code == 200
    spans = received(receiver, model, 2)
    attempts = [attrs(s) | {"name": s.name} for s in spans if s.kind == s.SPAN_KIND_CLIENT]
    assert [(a["name"], a["gen_ai.operation.name"]) for a in attempts] == [(f"chat {model}", "chat")] * 2
    unreported, relayed = sorted(attempts, key=lambda a: "gen_ai.usage.input_tokens" in a)
    assert not [key for key in unreported if key.startswith("gen_ai.usage.")] and unreported["gen_ai.request.stream"]
    assert relayed["gen_ai.request.stream"] is False
    assert relayed["gen_ai.usage.input_tokens"] > 0 and "gen_ai.usage.cache_creation.input_tokens" not in relayed
    assert {a["server.port"] for a in attempts} == {urlsplit(fake.url).port}
    points = exported(receiver, model)
    assert [p.count for p in points["gen_ai.client.token.usage"]] == [1, 1]  # the relayed call's input and output
    assert all(attrs(p)["gen_ai.operation.name"] == "chat" for p in points["gen_ai.client.operation.duration"])
    assert all("server.port" in attrs(p) for p in points["gen_ai.client.operation.duration"])


@pytest.mark.parametrize(
    ("method", "operation"),
    [("chat.completions.create", "chat"), ("responses.create", "chat"), ("/chat/completions", "chat"),
     ("/v1/chat/completions", "chat"), ("/responses", "chat"), ("/v1/messages", "chat"),
     ("/model/anthropic.claude-x/invoke", "chat"), ("/model/m/invoke-with-response-stream", "chat"),
     ("/projects/p/locations/l/publishers/anthropic/models/claude-x:rawPredict", "chat"),
     ("/projects/p/locations/l/publishers/anthropic/models/claude-x:streamRawPredict", "chat"),
     ("/openai/deployments/d/chat/completions", "chat"), ("/completions", "text_completion"),
     ("/embeddings", "embeddings"), ("/openai/deployments/d/embeddings", "embeddings"),
     ("models.list", "models.list")],
)  # fmt: skip
def test_the_operation_is_named_alike_by_sdk_method_gateway_shim_and_cloud_path(method, operation):
    from broker.server.tracing import operation_name

    assert operation_name(method) == operation


def test_only_a_traces_endpoint_exports_traces_only_and_an_exporter_not_otlp_is_said(monkeypatch, caplog):
    """Found by verify22: a traces endpoint alone turned metrics on too (to localhost), and
    OTEL_TRACES_EXPORTER=console was taken for otlp."""
    from broker.server.tracing import exporting

    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces")
    assert exporting() == (True, False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://127.0.0.1:9/v1/metrics")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    with caplog.at_level("WARNING"):
        assert exporting() == (False, True)
    assert [r.getMessage() for r in caplog.records] == [
        "OTEL_TRACES_EXPORTER=console: isopool exports only otlp (or none); traces are not exported"
    ]


OLD_NAMES = (
    "gen_ai.client.operation.",
    "gen_ai.client.token.usage",
    "gen_ai.usage.cache_creation.",
    "gen_ai.token.type",
)


def test_the_latest_conventions_opted_in_rename_spans_and_metrics_of_a_clean_call_and_a_stall(
    fake, receiver, monkeypatch, own_processes
):
    """OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental: semantic-conventions-genai v0.1.0's names,
    none of v1.41.0's (without it: the tests above)."""
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http, gen_ai_latest_experimental")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    with traced_pool(fake, http="127.0.0.1:0") as pool, pool.client() as client:
        assert list(client.submit("anthropic", "messages.create", stream=True, **anthropic_args("latest, stalled"),
                                  **fault("stall-first:interval=0.05")))  # fmt: skip
        answer = httpx.post(f"{pool.http_url}/v1/messages", json=anthropic_args("latest, clean", top_k=40), timeout=30)
        assert answer.status_code == 200  # through the gateway: top_k in its body
    stalled, retried, clean = sorted((s for s in receiver.spans if s.kind == s.SPAN_KIND_CLIENT),
                                     key=lambda s: s.start_time_unix_nano)  # fmt: skip
    assert [s.name for s in (stalled, retried, clean)] == ["chat claude-fake"] * 3
    assert attrs(stalled)["error.type"] == "first_event_timeout" and attrs(stalled)["gen_ai.request.stream"]
    assert "gen_ai.response.time_to_first_chunk" not in attrs(stalled)  # no chunk came
    assert 0 < attrs(retried)["gen_ai.response.time_to_first_chunk"] < 2 and attrs(retried)["gen_ai.request.stream"]
    whole = attrs(clean)
    assert "gen_ai.request.stream" not in whole and "gen_ai.response.time_to_first_chunk" not in whole
    top_k = next(a.value for a in clean.attributes if a.key == "gen_ai.request.top_k")
    assert top_k.WhichOneof("value") == "int_value" and top_k.int_value == 40
    assert whole["gen_ai.usage.input_tokens"] > 0 and whole["gen_ai.usage.output_tokens"] > 1
    assert "gen_ai.usage.cache_read.input_tokens" not in whole  # the fake reports 0: absent, as v0.1.0 asks
    metrics = {}
    for metric in receiver.metrics:  # cumulative: the latest export of each holds every measurement
        metrics[metric.name] = metric
    assert not [name for name in metrics if name.startswith(OLD_NAMES)]
    assert not [s for s in receiver.spans for a in s.attributes if a.key.startswith(OLD_NAMES)]
    duration = {
        attrs(p).get("error.type"): p.count for p in metrics["gen_ai.client.inference.duration"].histogram.data_points
    }
    assert duration == {"first_event_timeout": 1, None: 2}  # the stall, its retry, the clean call
    assert metrics["gen_ai.client.inference.time_to_first_chunk"].histogram.data_points[0].count == 1
    assert metrics["gen_ai.client.inference.time_per_output_chunk"].histogram.data_points[0].count >= 1
    for kind in ("input_tokens", "output_tokens"):
        counter = metrics[f"gen_ai.client.inference.usage.{kind}"]
        assert counter.unit == "{token}" and counter.sum.is_monotonic  # a counter, not a histogram
        (point,) = counter.sum.data_points
        assert attrs(point)["gen_ai.token.modality"] == "unknown" and "error.type" not in attrs(point)
        assert point.as_int == whole[f"gen_ai.usage.{kind}"] + attrs(retried)[f"gen_ai.usage.{kind}"]
        per_call = metrics[f"gen_ai.client.inference.operation.{kind}"].histogram.data_points
        assert sum(p.count for p in per_call) == 2 and list(per_call[0].explicit_bounds)[:3] == [1, 4, 16]
    assert "gen_ai.client.inference.usage.reasoning.output_tokens" not in metrics  # the pool does not know them


def test_the_conventions_are_chosen_once_from_the_opt_in_list():
    from broker.server import semconv

    for value, version in (("", semconv.V1_41), ("http", semconv.V1_41), ("gen_ai_latest_experimental", semconv.V0_1_0),
                           ("database, GEN_AI_LATEST_EXPERIMENTAL ", semconv.V0_1_0)):  # fmt: skip
        os.environ["OTEL_SEMCONV_STABILITY_OPT_IN"] = value
        try:
            assert semconv.from_environment() is version
        finally:
            del os.environ["OTEL_SEMCONV_STABILITY_OPT_IN"]
    latest = semconv.V0_1_0
    assert latest.operation("embeddings").duration.name == "gen_ai.client.embeddings.duration"
    assert latest.operation("models.list").duration.name == "gen_ai.client.operation.duration"  # not inference
    assert {semconv.V1_41.operation(name).duration.name for name in ("chat", "embeddings")} == {
        "gen_ai.client.operation.duration"
    }
