"""Provider keys never appear in what isopool writes: its logs (at DEBUG), stats, error
messages, or batch outputs, whatever faults happen on the way."""

from __future__ import annotations

import json

import anthropic
import pytest

from broker import Pool, RequestError
from broker.batch import run
from broker.protocol import HttpCall
from broker.shim import anthropic as shim_anthropic

from .cloudkit import needs_clouds
from .conftest import TEST_SETTINGS, anthropic_args, fault, openai_args, profiles

CANARY = "LEAKCANARY"
FAULTS = ["stall-first:interval=0.05", "stall-ping:after=2,interval=0.05", "reset:after=2", "http-500",
          "http-429:retry_after=0,times=9", "http-529:times=9", "error-event:after=2"]  # fmt: skip


def outcomes(calls: list) -> list[str]:
    """What each call gave its caller: its events and result, or its error."""
    seen: list[str] = []
    for call in calls:
        try:
            seen += [event.data.decode() for event in call]
            seen.append(repr(call.result()))
        except RequestError as exc:
            seen += [str(exc), repr(exc), repr(exc.info)]
    return seen


def test_keys_never_appear_in_logs_stats_errors_or_outputs(fake, monkeypatch, capfd, tmp_path):
    monkeypatch.setenv("ANTHROPIC_API_KEY", f"sk-ant-{CANARY}-anthropic")
    monkeypatch.setenv("OPENAI_API_KEY", f"sk-{CANARY}-openai")
    seen: list[str] = []
    settings = dict(TEST_SETTINGS, first_event_timeout=1.0, stale_timeout=0.5, log_level="DEBUG", http="127.0.0.1:0")
    with Pool(profiles=profiles(fake.url, min_workers=1), **settings) as pool, pool.client() as client:
        calls = [  # all in flight at once: the faults' timeouts and backoffs overlap
            client.submit(profile, method, stream=stream, **make(f"leak {spec}"), **fault(spec))
            for spec in FAULTS
            for stream in (False, True)
            for profile, method, make in (("anthropic", "messages.create", anthropic_args),
                                          ("openai", "chat.completions.create", openai_args))
        ]  # fmt: skip
        seen += outcomes(calls)
        for refused in ({"extra_headers": {"x-api-key": "sk-other"}}, {}):
            try:
                client.request("anthropic", "_client.post" if not refused else "messages.create",
                               **anthropic_args("refused"), **refused)  # fmt: skip
            except RequestError as exc:
                seen += [str(exc), repr(exc.info)]
        shim = shim_anthropic.Anthropic(pool=pool, max_retries=0)
        for spec in FAULTS:
            try:
                seen.append(shim.messages.create(**anthropic_args(f"shim {spec}"), **fault(spec)).model_dump_json())
            except anthropic.APIError as exc:
                seen += [str(exc), repr(exc), str(exc.__cause__), str(getattr(exc, "body", ""))]
        via_gateway = anthropic.Anthropic(base_url=pool.http_url, api_key="anything", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as caught:
            via_gateway.messages.create(**anthropic_args("gateway"), **fault("http-529:times=9"))
        seen.append(str(caught.value.body))
        source = tmp_path / "in.jsonl"
        source.write_text("".join(
            json.dumps({"custom_id": f"r{i}", "params": {"max_tokens": 16, **anthropic_args(f"batch {i}"),
                        "model": f"claude-fake@{spec}"}}) + "\n" for i, spec in enumerate(FAULTS)
        ))  # fmt: skip
        run(str(source), str(tmp_path / "out.jsonl"), pool=pool, retry_budget=0)
        seen.append((tmp_path / "out.jsonl").read_text())
        seen.append(json.dumps(client.stats()))
    logs = capfd.readouterr()
    seen += [logs.out, logs.err]
    assert "DEBUG" in logs.err and "failed" in logs.err  # workers logged their failures, tracebacks included
    leaks = [text for text in seen if CANARY in text]
    assert not leaks, leaks[:3]


@needs_clouds
def test_cloud_credentials_never_appear_in_logs_stats_or_errors(fake, monkeypatch, capfd):
    """An AWS secret key (SigV4 in the workers), a Vertex access token and an Azure key, through SDK
    calls and relayed requests, with faults: none of them in what isopool writes."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID0000")  # not the fake's test key: form checked only
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"{CANARY}-aws-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", f"{CANARY}-aws-session")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("VERTEX_TOKEN", f"{CANARY}-vertex-token")
    monkeypatch.setenv("AZURE_KEY", f"{CANARY}-azure-key")
    one = {"min_workers": 1, "spare_workers": 0}
    cloud = {
        "bedrock": {"kind": "bedrock", "region": "us-east-1", "base_url": fake.url, **one},
        "vertex": {"kind": "vertex", "region": "us-east5", "project": "p", "base_url": fake.url + "/v1",
                   "api_key_env": "VERTEX_TOKEN", **one},
        "azure": {"kind": "azure", "endpoint": fake.url, "api_version": "2024-10-21", "api_key_env": "AZURE_KEY",
                  **one},
    }  # fmt: skip
    seen: list[str] = []
    settings = dict(TEST_SETTINGS, first_event_timeout=1.0, stale_timeout=0.5, log_level="DEBUG")
    with Pool(profiles=cloud, **settings) as pool, pool.client() as client:
        calls = [
            client.submit(kind, method, stream=stream, model=model, max_tokens=16, **fault(spec),
                          messages=[{"role": "user", "content": f"leak {kind} {spec}"}])
            for spec in FAULTS
            for stream in (False, True)
            for kind, method, model in (("bedrock", "messages.create", "anthropic.claude-fake"),
                                        ("vertex", "messages.create", "claude-fake"),
                                        ("azure", "chat.completions.create", "gpt-fake"))
        ]  # fmt: skip
        body = json.dumps({"anthropic_version": "v", "max_tokens": 16, "messages": [{"role": "user", "content": "r"}]})
        relayed = HttpCall("POST", "/model/m/invoke", [("x-isopool-fault", "http-529:times=9")], body.encode())
        calls.append(client.submit_http("bedrock", relayed))
        seen += outcomes(calls)
        seen.append(json.dumps(client.stats()))
    logs = capfd.readouterr()
    seen += [logs.out, logs.err]
    assert "DEBUG" in logs.err and "failed" in logs.err
    leaks = [line for text in seen for line in text.splitlines() if CANARY in line]
    assert not leaks, leaks[:5]
