"""The request log (issue 22): one JSON line per finished request, with its attempts; no content
and no key; rotated by size; a full disk loses lines, never requests."""

from __future__ import annotations

import json
import os

import pytest

from broker import ConfigError, Pool, ProviderStatusError
from broker.config import load_settings
from broker.server.genai import CONTENT_CHARS
from broker.server.requestlog import RequestLine, RequestLog

from .conftest import TEST_SETTINGS, anthropic_args, fault, wait_for

PROMPT = "a prompt that must not reach the log"


def pool_logging_to(fake, path, **settings):
    profiles = {"anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 1}}
    return Pool(
        profiles=profiles, **{**TEST_SETTINGS, "first_event_timeout": 1.0, "request_log": str(path), **settings}
    )


def test_each_request_is_one_line_saying_how_each_attempt_went(fake, tmp_path, own_processes):
    path = tmp_path / "requests.jsonl"
    with pool_logging_to(fake, path) as pool, pool.client() as client:
        client.request("anthropic", "messages.create", **anthropic_args(PROMPT))
        list(client.submit("anthropic", "messages.create", stream=True, **anthropic_args(f"{PROMPT} 2"),
                           **fault("stall-first:interval=0.05")))  # fmt: skip
        with pytest.raises(ProviderStatusError):
            client.request("anthropic", "messages.create", **anthropic_args(f"{PROMPT} 3"), **fault("context-length"))
    text = path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["status"] for line in lines] == ["ok", "ok", "error:provider_status"]
    clean, retried, refused = lines
    assert clean["profile"] == "anthropic" and clean["model"] == "claude-fake" and clean["answered_by"] == "anthropic"
    assert [a["outcome"] for a in clean["attempts"]] == ["ok"] and clean["attempts"][0]["first_event"] is not None
    assert [a["outcome"] for a in retried["attempts"]] == ["first_event_timeout", "ok"]
    assert retried["attempts"][0]["first_event"] is None and retried["attempts"][0]["took"] >= 0.9
    assert retried["attempts"][1]["started"] >= retried["attempts"][0]["took"] and retried["delivered"] > 0
    assert [a["outcome"] for a in refused["attempts"]] == ["context_length"]  # what the provider refused
    assert len({line["request"] for line in lines}) == 3 and len({line["client"] for line in lines}) == 1
    assert "prompt" not in text and os.environ["ANTHROPIC_API_KEY"] not in text
    assert all(line["content"] is None for line in lines)  # content only with request_log_content


def test_the_log_is_rotated_by_size(fake, tmp_path, own_processes):
    path = tmp_path / "requests.jsonl"
    with pool_logging_to(fake, path, request_log_max_bytes=1500, request_log_backups=2) as pool:
        with pool.client() as client:
            for i in range(15):
                client.request("anthropic", "messages.create", **anthropic_args(f"rotate {i}"))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["requests.jsonl", "requests.jsonl.1", "requests.jsonl.2"]
    assert all((tmp_path / name).stat().st_size <= 1500 for name in files)
    newest = [json.loads(line)["request"] for line in path.read_text().splitlines()]
    assert newest and newest[-1] == 15


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a disk that is always full)")
def test_a_full_disk_loses_log_lines_and_says_so_but_every_request_is_answered(fake, own_processes):
    with pool_logging_to(fake, "/dev/full", request_log_max_bytes=0) as pool, pool.client() as client:
        for i in range(3):
            assert client.request("anthropic", "messages.create", **anthropic_args(f"full {i}")).status == 200
        assert wait_for(lambda: client.snapshot().request_log_lost >= 3, 10, "the lost lines counted")
        assert client.snapshot().requests["ok"] == 3


def test_a_path_that_is_not_a_file_and_a_rotation_without_backups_are_refused_at_load(tmp_path):
    """Found by the session-27 review: a FIFO without a reader hung the broker's shutdown for good, and
    0 backups left a size-limited log unbounded."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(ConfigError, match="is not a file"):
            load_settings(None, request_log=str(path))
    with pytest.raises(ConfigError, match="at least 1 backup"):
        load_settings(None, request_log=str(tmp_path / "log.jsonl"), request_log_backups=0)
    assert load_settings(None, request_log=str(tmp_path / "log.jsonl"), request_log_backups=0,
                         request_log_max_bytes=0).request_log  # fmt: skip


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a disk that is always full)")
def test_closing_a_log_on_a_full_disk_counts_the_line_and_does_not_raise():
    log = RequestLog("/dev/full", 0, 5)
    log.write(RequestLine("t", 1, "c", "p", "m", "p", "ok", [], 0, 0.0))
    log.close()
    assert log.lost >= 1


def test_with_request_log_content_a_line_has_the_messages_and_the_answers_text_bounded(fake, tmp_path,
                                                                                      own_processes):  # fmt: skip
    path = tmp_path / "requests.jsonl"
    with pool_logging_to(fake, path, request_log_content=True) as pool, pool.client() as client:
        answer = client.request("anthropic", "messages.create", **anthropic_args(PROMPT, system="be brief"))
        client.request("anthropic", "messages.create", **anthropic_args("y" * 100_000))
    said, long = (json.loads(line)["content"] for line in path.read_text().splitlines())
    assert said["input"] == [{"role": "user", "parts": [{"type": "text", "content": PROMPT}]}]
    assert said["system"] == [{"type": "text", "content": "be brief"}]
    text = answer.json()["content"][0]["text"]
    assert said["output"] == [{"role": "assistant", "parts": [{"type": "text", "content": text}],
                               "finish_reason": "end_turn"}]  # fmt: skip
    assert len(long["input"][0]["parts"][0]["content"]) == CONTENT_CHARS  # of 100 000 sent
    assert os.environ["ANTHROPIC_API_KEY"] not in path.read_text()
