"""Provider keys never appear in what isopool writes: its logs (at DEBUG), stats, error
messages, or batch outputs, whatever faults happen on the way."""

from __future__ import annotations

import json

import anthropic
import pytest

from broker import Pool, RequestError
from broker.batch import run
from broker.shim import anthropic as shim_anthropic

from .conftest import TEST_SETTINGS, anthropic_args, fault, openai_args, profiles

CANARY = "LEAKCANARY"
FAULTS = ["stall-first:interval=0.05", "stall-ping:after=2,interval=0.05", "reset:after=2", "http-500",
          "http-429:retry_after=0,times=9", "http-529:times=9", "error-event:after=2"]  # fmt: skip


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
        for call in calls:
            try:
                seen += [event.data.decode() for event in call]
                seen.append(repr(call.result()))
            except RequestError as exc:
                seen += [str(exc), repr(exc), repr(exc.info)]
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
