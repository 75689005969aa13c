"""`isopool loadtest --trace`: a request trace replayed at its own times (Mooncake's format, with
prompts made from its hash_ids, or batch-format requests with timestamps), shared-prefix
workloads, and the cached input tokens the server reports, against the built-in fake's
prefix cache."""

from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys

import msgspec
import pytest

from broker.fake_provider.prefix_cache import PrefixCache
from broker.loadtest import Options, run
from broker.loadtest.summary import distribution
from broker.loadtest.trace import Trace, read
from broker.protocol import Tick

ISOPOOL = [sys.executable, "-c", "from broker.cli import main; main()"]
BLOCK = 512  # tokens per Mooncake hash_id
JSON_WORDS = 3  # the fake counts words of the JSON messages: `[{"role":`, `"user",`, `"content":` come first


def _records(out) -> list[dict]:
    with open(os.path.join(out, "records.jsonl")) as f:
        return sorted((json.loads(line) for line in f), key=lambda r: r["conversation"])


def _write(path, lines) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _mooncake(n: int = 30, spacing_ms: int = 50) -> list[dict]:
    """Requests 50 ms apart in three families: each shares its family's first two blocks, every
    third one a family's first block only; then blocks of its own and a partial tail."""
    lines = []
    for i in range(n):
        family = i % 3
        shared = [100 * family, 100 * family + 1] if i % 9 < 6 else [100 * family]
        own = [1000 + i]
        tail = 40 + 7 * i
        lines.append({"timestamp": i * spacing_ms, "input_length": BLOCK * (len(shared) + len(own) - 1) + tail,
                      "output_length": 3 + i % 5, "hash_ids": shared + own})  # fmt: skip
    return lines


def _expected_cached(lines: list[dict], order: list[int]) -> list[int]:
    """What a prefix cache holds for each request, taken in `order`: the leading blocks an earlier one had."""
    seen: set[tuple[int, ...]] = set()
    cached = [0] * len(lines)
    for i in order:
        ids = lines[i]["hash_ids"]
        cached[i] = BLOCK * next((k for k in range(len(ids), 0, -1) if tuple(ids[:k]) in seen), 0)
        seen.update(tuple(ids[:k]) for k in range(1, len(ids) + 1))
    return cached


def test_a_mooncake_trace_goes_out_at_its_times_with_its_lengths_and_shared_prefixes_are_cached(
    tmp_path, own_processes
):
    lines = _mooncake()
    trace = _write(tmp_path / "trace.jsonl", lines)
    results = run(Options(calibrate=False, trace=trace, speedup=2.0, fake_gap=0.002), str(tmp_path / "out"))
    point = results["points"][0]
    assert point["load"] == {"trace": "trace.jsonl", "speedup": 2.0, "max_concurrency": 0}
    records = _records(tmp_path / "out")
    assert [r["conversation"] for r in records] == list(range(30))
    for line, r in zip(lines, records, strict=True):
        assert r["outcome"] == "ok"
        assert r["scheduled"] == pytest.approx(line["timestamp"] / 1000 / 2, abs=1e-5)  # the trace's time, halved
        assert 0 <= r["submitted"] - r["scheduled"] < 0.25 and r["sent"] >= r["submitted"]  # generous: a shared CPU
        assert r["output_tokens"] == r["requested_tokens"] == line["output_length"]
        assert r["input_tokens"] == line["input_length"] + JSON_WORDS  # what the fake counted of the prompt
    late = sorted(r["submitted"] - r["scheduled"] for r in records)
    assert point["generator"]["submit_late_p99"] == pytest.approx(late[int(0.99 * 29)], abs=1e-6)
    # in the order the fake saw them (the trace's, unless a busy machine held one worker back)
    expected = _expected_cached(lines, sorted(range(30), key=lambda i: records[i]["sent"]))
    assert sum(1 for c in expected if c) >= 20 and {c for c in expected} == {0, BLOCK, 2 * BLOCK}
    assert [r["cached_tokens"] for r in records] == expected
    cache = point["summary"]["cache"]
    assert cache["cached_input_tokens"] == sum(expected)
    assert cache["cached_share"] == pytest.approx(sum(expected) / sum(r["input_tokens"] for r in records), abs=1e-3)
    assert (cache["hits"], cache["misses"], cache["reported"]) == (sum(1 for c in expected if c),
                                                                   sum(1 for c in expected if not c), 30)  # fmt: skip
    assert cache["ttft_hit"] == distribution([r["ttft"] for r in records if r["cached_tokens"]])
    assert cache["ttft_miss"] == distribution([r["ttft"] for r in records if not r["cached_tokens"]])


def test_a_trace_of_batch_requests_with_timestamps_goes_out_at_its_times(tmp_path, own_processes):
    lines = [{"timestamp": 80 * i, "custom_id": f"q{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": "gpt-fake", "max_output_tokens": 4 + i, "input": f"question {i}"}}
             for i in range(8)]  # fmt: skip
    trace = _write(tmp_path / "trace.jsonl", lines[::-1])  # out of order in the file: replayed in time order
    results = run(Options(calibrate=False, trace=trace, speedup=4.0, requests=6), str(tmp_path / "out"))
    assert results["api"] == "responses" and results["points"][0]["summary"]["outcomes"] == {"ok": 6}
    records = _records(tmp_path / "out")
    assert [r["scheduled"] for r in records] == pytest.approx([0.02 * i for i in range(6)], abs=1e-5)
    assert [r["output_tokens"] for r in records] == [4 + i for i in range(6)]  # -n 6 cut the trace short
    assert all(r["cached_tokens"] == 0 for r in records)  # responses report their cached tokens, none here


@pytest.mark.parametrize("api,how", [("messages", "stream"), ("chat", "plain"), ("responses", "stream"),
                                     ("messages", "sdk")])  # fmt: skip
def test_a_shared_prefix_workload_is_cached_by_the_fake(tmp_path, own_processes, api, how):
    """Each API's usage, read from the stream's events, from a plain answer, or from the SDK's objects."""
    options = Options(calibrate=False, api=api, concurrency=[1], requests=10, prefix_tokens=BLOCK, prefix_groups=3,
                      input_tokens="40", output_tokens="3", seed=4, stream=how != "plain",
                      sdk=how == "sdk")  # fmt: skip
    point = run(options, str(tmp_path))["points"][0]
    records = _records(tmp_path)
    prompt = (0 if api == "responses" else JSON_WORDS) + BLOCK + 40  # responses: the prompt is a bare string
    assert all(r["input_tokens"] == prompt for r in records)  # the prefix, then 40 words of its own
    misses = [r for r in records if not r["cached_tokens"]]
    assert 2 <= len(misses) <= 3  # the first request of each group the RNG chose (it chose 2 or 3 of them)
    assert all(r["cached_tokens"] in (0, BLOCK) for r in records)  # a hit: the shared prefix, exactly
    assert point["summary"]["cache"]["cached_input_tokens"] == BLOCK * (10 - len(misses))
    if api == "messages":  # Anthropic: what was newly written to the cache (whole 16-word blocks) is kept too
        full = (prompt - 1) // 16 * 16
        assert [r["cache_creation_tokens"] for r in records] == [full - r["cached_tokens"] for r in records]
    else:
        assert all(r["cache_creation_tokens"] is None for r in records)


def test_a_stall_in_a_trace_is_cut_and_counted(tmp_path, own_processes):
    trace = _write(tmp_path / "trace.jsonl", _mooncake(20, 25))  # 20 requests 25 ms apart
    options = Options(calibrate=False, trace=trace, duration=0.3, stale_timeout=1.0, fake_gap=0.002, seed=3,
                      fake_faults={"silent:after=3": 0.25})  # fmt: skip
    results = run(options, str(tmp_path / "out"))
    stalled = results["fake_provider"]["faults"].get("silent", 0)
    summary = results["points"][0]["summary"]
    assert len(_records(tmp_path / "out")) == 12  # --duration 0.3 cut the trace after those due before 0.3 s
    assert stalled >= 2 and summary["outcomes"] == {"ok": 12 - stalled, "stall": stalled}
    assert summary["stalls"]["after_tokens"] == [2] * stalled  # the role chunk, then 2 tokens
    assert 0.9 <= summary["stalls"]["waited"]["p50"] <= 1.5


def test_bad_trace_files_and_options_are_refused_with_what_to_do(tmp_path):
    good = {"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}
    batch = {"timestamp": 5, "custom_id": "a", "params": {"model": "m", "max_tokens": 3, "messages": []}}
    cases = {
        "mixed": ([good, batch], "line 2.*batch request.*line 1.*Mooncake"),
        "json": ([good, "{not json"], "line 2.*JSON"),
        "untimed": ([good, {k: v for k, v in good.items() if k != "timestamp"}], "line 2.*timestamp"),
        "negative": ([{**good, "timestamp": -3}], "line 1.*timestamp"),
        "neither": ([{"timestamp": 1, "prompt": "hi"}], "line 1.*neither"),
        "lengths": ([{**good, "input_length": "ten"}], "line 1.*input_length"),
        "huge": ([good, {**good, "input_length": 50_000_000}], "line 2.*<= 2000000.*input_length"),
        "batch": ([batch, {**batch, "timestamp": 9, "params": None}], "line 2.*params"),
        "empty": ([], "no requests"),
    }
    for name, (lines, error) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        with pytest.raises(ValueError, match=error):
            Options(trace=str(path)).workload()
    ok = _write(tmp_path / "ok.jsonl", [good])
    for wrong, error in (({"rate": [2.0]}, "--trace"), ({"dataset": ok}, "--trace"), ({"turns": 2}, "--trace"),
                         ({"concurrency": [4]}, "--trace"), ({"speedup": 0.0}, "speedup"),
                         ({"prefix_tokens": 64}, "--trace")):  # fmt: skip
        with pytest.raises(ValueError, match=error):
            Options(trace=ok, **wrong)
    with pytest.raises(ValueError, match="prefix-tokens"):
        Options(prefix_groups=4)
    for huge in ({"prefix_tokens": 10**9}, {"input_tokens": "50000000"}, {"input_tokens": "mean=10,max=10000000"}):
        with pytest.raises(ValueError, match="2,000,000"):  # a typo, not gigabytes of prompt built in memory
            Options(**huge).workload()
    with pytest.raises(ValueError, match="messages"):  # a trace's requests are of one API, and --api must agree
        Options(trace=_write(tmp_path / "anthropic.jsonl", [batch]), api="chat", target="fake").workload()
    cli = subprocess.run(ISOPOOL + ["loadtest", "--trace", str(tmp_path / "mixed.jsonl")], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert cli.returncode == 2 and "mixed.jsonl" in cli.stderr and "line 2" in cli.stderr


def test_a_tick_from_before_cached_tokens_still_decodes():
    old = msgspec.msgpack.encode([5, 1, 0, 0, 7, 30])  # t, tokens, sent, status, output_tokens, input_tokens
    tick = msgspec.msgpack.Decoder(Tick).decode(old)
    assert (tick.output_tokens, tick.input_tokens, tick.cached_tokens, tick.cache_creation_tokens) == (7, 30, -1, -1)


def test_the_fakes_prefix_cache_counts_whole_leading_blocks_and_forgets_the_least_recently_used():
    cache = PrefixCache(capacity=4, block=2)
    a, b = "a b c d e".split(), "x y z w v".split()
    assert cache.admit("m", a) == (0, 4)  # two whole blocks written; the last word is never cached
    assert cache.admit("m", a[:4] + ["q", "r"]) == (4, 0)  # the same two blocks found, nothing new in whole blocks
    assert cache.admit("other-model", a) == (0, 4)  # a prefix is cached per model
    assert cache.admit("m", ["a", "b", "z", "z", "y"]) == (2, 2)  # the shared first block only
    assert cache.admit("m", b) == (0, 4)  # 4 blocks kept at most: the least recently used went first
    assert cache.admit("m", a) == (2, 2)  # `a b`, used again above, stayed; `c d`, not since, went
    assert cache.admit("other-model", a) == (0, 4)  # and the other model's blocks, older still


def test_a_trace_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Editors on Windows start a UTF-8 file with a BOM: it was "malformed JSON (byte 0)"."""
    path = tmp_path / "bom.jsonl"
    lines = [{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1]},
             {"timestamp": 250, "input_length": 10, "output_length": 5, "hash_ids": [1]}]  # fmt: skip
    path.write_bytes(codecs.BOM_UTF8 + b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    times, read_lines = read(str(path))
    assert times == [0, 250] and [line.input_length for line in read_lines] == [10, 10]


def test_how_long_a_replay_takes_is_said_before_it_starts(tmp_path):
    """Timestamps in µs instead of ms replay 1000x slower; the run said nothing until it had gone on for hours."""
    path = tmp_path / "micro.jsonl"
    lines = [{"timestamp": t, "input_length": 10, "output_length": 5, "hash_ids": [1]} for t in (0, 3_600_000_000)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    trace = Trace(str(path), True, "", "chat")
    assert trace.describe(4.0, 0.0) == ("the trace holds 2 requests over 900,000.0 s at 4x its speed "
                                        "(timestamps read as ms)")  # fmt: skip
    assert trace.describe(1.0, 60.0).endswith("; --duration stops it after 60 s")
