"""`isopool loadtest` against the built-in fake provider: timings match its latency
model, stalls are cut and counted where they happened, schedules keep their rate and
shape, a killed run leaves records that `report` renders, and sweeps have every field."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx2
import pytest

from broker.fake_provider import FakeProviderProcess
from broker.fake_provider.server import Latency
from broker.loadtest import Options, rebuild, run
from broker.loadtest.report import save_outputs
from broker.loadtest.schedule import arrivals
from broker.loadtest.search import Search
from broker.loadtest.summary import LATENCIES, parse_slo, steady_window, verdict, window_flow
from broker.loadtest.workload import Lengths

from .conftest import wait_for

ISOPOOL = [sys.executable, "-c", "from broker.cli import main; main()"]
RECORD_FIELDS = {
    "id", "point", "conversation", "turn", "warmup", "scheduled", "submitted", "sent", "first_token", "end",
    "received", "ttft", "ttft_from_schedule", "e2e", "e2e_from_schedule", "tpot", "gaps", "output_tokens", "chunks",
    "input_tokens", "requested_tokens", "status", "outcome", "error", "stall", "cached_tokens", "cache_creation_tokens",
}  # fmt: skip


def _records(out) -> list[dict]:
    with open(os.path.join(out, "records.jsonl")) as f:
        return [json.loads(line) for line in f]


def _direct_ttfts(url: str, n: int) -> list[float]:
    """Time to the first token measured by a plain HTTP client: what the fake itself adds."""
    times = []
    with httpx2.Client() as http:
        for i in range(n):
            body = {"model": "m", "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": f"d{i}"}]}
            start = time.monotonic()
            with http.stream(
                "POST", url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer k"}
            ) as r:
                for line in r.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        times.append(time.monotonic() - start)
                        break
    return times


def test_measured_ttft_and_gaps_match_the_fake_providers_latency_model(tmp_path, own_processes):
    # chat streams a role chunk at ttft, then a token every gap: the first token comes at ttft + gap, the
    # second a gap later. The gap is wide enough that a loaded machine's few ms cannot pass for a token.
    with FakeProviderProcess(Latency(ttft=0.05, gap=0.03, tokens=1_000_000)) as fake:
        direct = statistics.median(_direct_ttfts(fake.url, 12))
        options = Options(calibrate=False, target=fake.url + "/v1", concurrency=[2], requests=12, output_tokens="20")
        point = run(options, str(tmp_path))["points"][0]
        direct = min(direct, statistics.median(_direct_ttfts(fake.url, 12)))  # before and after: the quieter
    latency = point["summary"]["latency"]
    assert point["summary"]["outcomes"] == {"ok": 12}
    assert 0.080 <= latency["ttft"]["p50"] <= direct + 0.012, (latency["ttft"], direct)
    assert 0.0295 <= latency["itl"]["p50"] <= 0.0325, latency["itl"]
    assert latency["itl"]["n"] == 12 * 19
    for record in _records(tmp_path):
        assert set(record) == RECORD_FIELDS
        assert record["output_tokens"] == record["chunks"] == 20 and len(record["gaps"]) == 19
        assert record["scheduled"] <= record["submitted"] <= record["sent"] < record["first_token"] <= record["end"]


def test_stalls_are_cut_counted_at_their_token_and_leave_the_rest_alone(tmp_path, own_processes):
    stalls = {"stall-ping:after=5": 0.04, "stall-comment:after=5": 0.03, "silent:after=5": 0.03}
    options = Options(calibrate=False, concurrency=[16], requests=150, output_tokens="20", fake_gap=0.005,
                      stale_timeout=1.0, fake_faults=stalls, seed=3)  # fmt: skip
    results = run(options, str(tmp_path))
    summary = results["points"][0]["summary"]
    injected = results["fake_provider"]["faults"]
    expected = sum(injected.get(kind, 0) for kind in ("stall-ping", "stall-comment", "silent"))
    assert expected >= 5, injected  # the draw did inject stalls of the kinds asked for
    assert summary["requests"] == 150 and summary["outcomes"] == {"ok": 150 - expected, "stall": expected}
    # after=5 events of a chat stream: the role chunk, then 4 tokens
    assert summary["stalls"]["after_tokens"] == [4] * expected
    assert 0.9 <= summary["stalls"]["waited"]["p50"] <= 1.5
    # a stalled stream holds only its own lane: the others never waited on it
    assert summary["latency"]["e2e"]["p99"] < 0.5
    stalled = [r for r in _records(tmp_path) if r["outcome"] == "stall"]
    assert all(r["stall"]["after_tokens"] == 4 and r["chunks"] == 4 and r["tpot"] is None for r in stalled)


def test_arrival_schedules_have_their_rate_and_shape():
    poisson = list(_take(arrivals(50.0, "poisson", seed=1), 20_000))
    gaps = [b - a for a, b in zip(poisson, poisson[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    constant = list(_take(arrivals(20.0, "constant"), 100))
    assert constant[0] == 0.0 and all(
        b - a == pytest.approx(0.05) for a, b in zip(constant, constant[1:], strict=False)
    )
    ramped = list(_take(arrivals(10.0, "constant", ramp=4.0), 200))
    first_ramp = sum(1 for t in ramped if t < 4.0)
    assert first_ramp == pytest.approx(10.0 * 4.0 / 2, abs=1)  # half the arrivals of a full-rate 4 s
    assert ramped[-1] - ramped[-2] == pytest.approx(0.1)


def _take(iterator, n):
    for _, value in zip(range(n), iterator, strict=False):
        yield value


@pytest.mark.parametrize("arrival", ["poisson", "constant"])
def test_an_open_loop_sends_at_the_requested_rate(tmp_path, own_processes, arrival):
    options = Options(calibrate=False, rate=[40.0], arrival=arrival, requests=160, output_tokens="10", seed=5)
    point = run(options, str(tmp_path))["points"][0]
    records = _records(tmp_path)
    rel = 0.2 if arrival == "poisson" else 0.03
    scheduled = sorted(r["scheduled"] for r in records)
    assert (len(scheduled) - 1) / (scheduled[-1] - scheduled[0]) == pytest.approx(40.0, rel=rel)  # the schedule's
    # rate, and its shape (the sends' own gaps also carry a loaded machine's scheduling noise)
    gaps = [b - a for a, b in zip(scheduled, scheduled[1:], strict=False)]
    cv = statistics.stdev(gaps) / statistics.fmean(gaps)
    assert (0.75 < cv < 1.25) if arrival == "poisson" else cv < 0.05, cv
    # the sends follow it: at its rate (a last send 100 ms late on two cores at load 13 is 2.5%), most of them
    # within 50 ms of their time; how late the latest were the generator measures and says itself
    sent = sorted(r["sent"] for r in records)
    assert (len(sent) - 1) / (sent[-1] - sent[0]) == pytest.approx(40.0, rel=rel + 0.05)
    assert statistics.median(r["sent"] - r["scheduled"] for r in records) < 0.05
    late = sorted(r["submitted"] - r["scheduled"] for r in records if not r["warmup"] and r["end"] is not None)
    late_p99 = point["generator"]["submit_late_p99"]
    assert late_p99 == round(late[int(0.99 * (len(late) - 1))], 6)
    assert ("after their schedule" in point["generator"]["verdict"]) == (late_p99 > 0.05), point["generator"]


def test_the_verdict_names_what_limited_the_generator():
    kept_up = {"in_flight_mean": 63.5, "loop_lag_p99": 0.002, "submit_late_p99": 0.001}
    assert verdict({"concurrency": 64}, kept_up) == "the generator kept up"
    starved = verdict({"concurrency": 64}, kept_up | {"in_flight_mean": 31.0, "loop_lag_p99": 0.2})
    assert starved.startswith("the generator was the limit") and "31.0 of the 64" in starved and "200 ms" in starved
    late = verdict({"rate": 50.0, "max_concurrency": 0}, kept_up | {"submit_late_p99": 0.3})
    assert "300 ms after their schedule" in late


def kill_a_run(out: str, args: list[str], written: int) -> None:
    """Run `isopool loadtest ARGS -o OUT` and SIGKILL it once `written` bytes of records are out."""
    proc = subprocess.Popen(ISOPOOL + ["loadtest", *args, "-o", out], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        records = os.path.join(out, "records.jsonl")
        wait_for(lambda: os.path.exists(records) and os.path.getsize(records) > written, 60, "records to be written")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_killed_run_leaves_records_that_report_renders(tmp_path, own_processes):
    out = str(tmp_path / "run")
    kill_a_run(out, ["-n", "5000", "-c", "4", "--output-tokens", "20", "--fake-gap", "0.005", "--no-calibrate"], 20_000)
    with open(os.path.join(out, "records.jsonl"), "rb") as f:
        complete = sum(1 for line in f.read().split(b"\n") if line.endswith(b"}"))
    report = subprocess.run(ISOPOOL + ["loadtest", "report", out, "--json"], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    rebuilt = json.loads(report.stdout)
    summary = rebuilt["points"][0]["summary"]
    assert summary["requests"] == complete and summary["outcomes"] == {"ok": complete}
    assert rebuilt["points"][0]["load"] == {"concurrency": 4}
    table = subprocess.run(ISOPOOL + ["loadtest", "report", out], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "TTFT" in table.stdout and "c=4" in table.stdout


def test_ctrl_c_names_the_records_kept_and_report_renders_them(tmp_path, own_processes):
    """Ctrl-C printed click's bare "Aborted!" (exit 1), not where the run's records are or how to read them."""
    out = str(tmp_path / "run")
    args = ["loadtest", "-n", "5000", "-c", "4", "--output-tokens", "20", "--fake-gap", "0.005", "--no-calibrate"]
    proc = subprocess.Popen(ISOPOOL + [*args, "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    records = os.path.join(out, "records.jsonl")
    try:
        wait_for(lambda: os.path.exists(records) and os.path.getsize(records) > 5_000, 60, "records to be written")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, err  # as killed by it, so that a shell's loop stops
    assert f"interrupted: what ran is in {records}; `isopool loadtest report {out}` summarizes it" in err, err
    report = subprocess.run(ISOPOOL + ["loadtest", "report", out, "--json"], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["points"][0]["summary"]["requests"] > 0


def test_a_sweep_has_every_field_per_point(tmp_path, own_processes):
    options = Options(concurrency=[2, 6], requests=30, output_tokens="mean=12,sd=4,min=2,max=20", warmup=0.05,
                      fake_gap=0.005, slo="ttft=500ms,tpot=0.1")  # fmt: skip
    results = run(options, str(tmp_path))
    assert [p["load"] for p in results["points"]] == [{"concurrency": 2}, {"concurrency": 6}]
    calibration = results["calibration"]  # the generator's ceiling, measured first at the highest concurrency
    assert calibration["concurrency"] == 6 and calibration["chunks_per_s"] > 0 and calibration["requests_per_s"] > 0
    for point in results["points"]:
        summary = point["summary"]
        assert summary["requests"] + summary["warmup_requests"] == 30
        assert set(summary["latency"]) == set(LATENCIES)
        assert all(d["p50"] is not None for d in summary["latency"].values())
        assert summary["goodput"]["requests"] == summary["outcomes"]["ok"]
        assert set(point["generator"]) == {"in_flight_mean", "submit_late_p99", "loop_lag_p99", "cpu_cores_mean",
                                           "verdict"}  # fmt: skip
        assert point["series"] and {"offered", "sent", "completed", "in_flight"} <= set(point["series"][0])
    lengths = {r["output_tokens"] for r in _records(tmp_path)}
    assert len(lengths) > 3 and min(lengths) >= 2 and max(lengths) <= 20  # drawn from the distribution
    save_outputs(results, str(tmp_path))
    for plot in ("latency.png", "series.png", "sweep.png"):
        with open(tmp_path / plot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["load"] for r in rows] == ["c=2", "c=6"] and all(all(v != "" for v in r.values()) for r in rows)
    assert [p["summary"] for p in rebuild(str(tmp_path))["points"]] == [p["summary"] for p in results["points"]]


@pytest.mark.parametrize("api,stream", [("messages", True), ("responses", True), ("chat", False)])
def test_every_api_is_timed(tmp_path, own_processes, api, stream):
    options = Options(calibrate=False, api=api, stream=stream, concurrency=[2], requests=6, output_tokens="15")
    results = run(options, str(tmp_path))
    summary = results["points"][0]["summary"]
    assert summary["outcomes"] == {"ok": 6}
    assert {(r["output_tokens"], r["status"]) for r in _records(tmp_path)} == {(15, 200)}
    assert summary["latency"]["ttft"]["p50"] > 0


def test_bad_options_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="not both"):
        Options(calibrate=False, concurrency=[4], rate=[2.0])
    with pytest.raises(ValueError, match="mean"):
        Lengths.parse("sd=3")
    with pytest.raises(ValueError, match="ttft"):
        parse_slo("latency=3")
    with pytest.raises(ValueError, match="target"):
        Options(calibrate=False, target="ftp://x")
    for alone in ({"find_max": Search(), "slo": "ttft=1"}, {"server_metrics": "target"}, {"trace": __file__}):
        with pytest.raises(ValueError, match="cannot be spread over Ray nodes yet: run it without --ray"):
            Options(calibrate=False, ray="auto", **alone)
    cli = subprocess.run(ISOPOOL + ["loadtest", "--input-tokens", "lots"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "mean=N" in cli.stderr


@pytest.mark.parametrize("given", [{"rate": [math.nan]}, {"rate": [math.inf]}, {"duration": math.inf},
                                   {"fake_gap": math.nan}, {"fake_faults": {"stall-ping": math.nan}}])  # fmt: skip
def test_a_number_that_is_not_finite_is_refused_naming_its_option(given):
    """nan passes every comparison: `--rate nan` passed the checks and crashed the schedule with a traceback."""
    name = next(iter(given))
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be a finite number"):
        Options(calibrate=False, **given)


def test_multi_turn_conversations_grow_and_go_in_order(tmp_path, own_processes):
    options = Options(calibrate=False, turns=3, concurrency=[2], requests=12, input_tokens="4", output_tokens="5")
    run(options, str(tmp_path))
    records = _records(tmp_path)
    conversations: dict[int, list[dict]] = {}
    for record in records:
        conversations.setdefault(record["conversation"], []).append(record)
    assert len(conversations) == 4 and all(len(turns) == 3 for turns in conversations.values())
    for turns in conversations.values():
        turns.sort(key=lambda r: r["turn"])
        assert [r["turn"] for r in turns] == [0, 1, 2]
        assert turns[0]["input_tokens"] < turns[1]["input_tokens"] < turns[2]["input_tokens"]  # the history grows
        assert all(b["scheduled"] >= a["received"] for a, b in zip(turns, turns[1:], strict=False))  # one at a time


def test_a_dataset_in_the_batch_format_is_sent_as_it_is(tmp_path, own_processes):
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-fake", "max_tokens": 7 + i, "messages": [{"role": "user", "content": f"q{i}"}]}}
             for i in range(3)]  # fmt: skip
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = run(Options(calibrate=False, dataset=str(path), concurrency=[2], requests=6), str(tmp_path / "out"))
    assert results["api"] == "chat" and results["points"][0]["summary"]["outcomes"] == {"ok": 6}
    assert sorted(r["output_tokens"] for r in _records(tmp_path / "out")) == [7, 7, 8, 8, 9, 9]  # cycled
    bad = tmp_path / "embeddings.jsonl"
    bad.write_text(json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                               "body": {"model": "e", "input": "x"}}) + "\n")  # fmt: skip
    with pytest.raises(ValueError, match="one API"):
        Options(dataset=str(bad)).workload()


def test_the_sdk_path_times_parsed_events_and_counts_stalls(tmp_path, own_processes):
    """--sdk: the official SDK parses every event in the generator; the pool still cuts stalls
    (one stream per worker, so a kill takes no neighbour) and they are counted as stalls."""
    options = Options(calibrate=False, sdk=True, concurrency=[4], requests=40, output_tokens="20", fake_gap=0.005,
                      stale_timeout=1.0, fake_faults={"stall-ping:after=5": 0.15}, seed=2)  # fmt: skip
    results = run(options, str(tmp_path))
    summary = results["points"][0]["summary"]
    stalled = results["fake_provider"]["faults"].get("stall-ping", 0)
    assert stalled >= 2 and summary["outcomes"] == {"ok": 40 - stalled, "stall": stalled}
    assert summary["stalls"]["after_tokens"] == [4] * stalled
    assert results["pool"]["streams_per_worker"] == 1
    ok = [r for r in _records(tmp_path) if r["outcome"] == "ok"]
    assert all(r["output_tokens"] == r["chunks"] == 20 and len(r["gaps"]) == 19 for r in ok)
    assert 0.004 <= summary["latency"]["itl"]["p50"] <= 0.008


def _timed(sent, first, gaps, end, chunks=None, warmup=False):
    """A hand-made record: only what the window counting reads."""
    chunks = len(gaps) + 1 if chunks is None else chunks
    return {"scheduled": sent, "sent": sent, "first_token": first, "gaps": gaps, "end": end, "chunks": chunks,
            "output_tokens": chunks, "outcome": "ok", "warmup": warmup}  # fmt: skip


def test_the_window_counts_chunks_and_streams_inside_it_whenever_their_requests_ran():
    records = [
        _timed(5, 6, [1.0] * 9, 15, warmup=True),  # started before: tokens at 6..15, 6 inside
        _timed(15, 16, [1.0] * 9, 25),  # ends after: 16..25, 4 inside
        _timed(0, 1, [1.0] * 29, 30, warmup=True),  # both: 1..30, 10 inside
        _timed(11, 12, [0.0, 1.0, 1.0], 14),  # inside: two deltas in one read at 12, then 13 and 14
        _timed(0, 1, [1.0], 2, warmup=True),  # over before the window
        _timed(17, 18, [], 18, chunks=5),  # a plain answer arrives whole
    ]
    flow = window_flow(records, 10.0, 20.0)
    assert flow["chunks"] == 6 + 4 + 10 + 4 + 0 + 5
    assert flow["in_flight"] == pytest.approx((5 + 5 + 10 + 3 + 0 + 1) / 10)
    assert steady_window(records, warmup=10.0, duration=20.0) == (10.0, 20.0)  # the run's own window, when known
    assert steady_window(records) == (11, 17)  # else from the first to the last schedule past the warm-up


def test_figures_survive_requests_longer_than_the_window(tmp_path, own_processes):
    # every request streams 150 tokens 40 ms apart (~6 s), three times the 2 s point: none ends inside it
    concurrency, gap = 4, 0.04
    options = Options(concurrency=[concurrency], duration=2.0, warmup=0.5, output_tokens="150", fake_ttft=0.01,
                      fake_gap=gap, calibrate=False)  # fmt: skip
    point = run(options, str(tmp_path))["points"][0]
    records = _records(tmp_path)
    assert len(records) == concurrency and all(r["e2e"] > 2 * options.duration for r in records)
    # the fake writes a token every `gap` on each stream, so the window saw about concurrency / gap chunks a second
    assert point["summary"]["throughput"]["chunks_per_s"] == pytest.approx(concurrency / gap, rel=0.2)
    assert point["generator"]["in_flight_mean"] == pytest.approx(concurrency, rel=0.05)
    window = point["summary"]["window"]
    assert (window["begin"], window["end"]) == (options.warmup, options.duration)  # the steady window, exactly
    assert "outlast" in window["note"] and "--duration" in window["note"]


def test_every_way_a_timed_request_ends_is_told_apart(tmp_path, own_processes):
    """A connection reset or closed mid-stream, an HTTP error, an error event mid-stream and a stream
    that ends cleanly without its terminal event each get their own outcome, after the tokens that came
    before; one that finished but never sends [DONE] nor closes is a success at once, not a stall."""
    faults = {"reset:after=5": 0.1, "http-500": 0.1, "error-event:after=5": 0.1, "close:after=5": 0.1,
              "cut:after=5": 0.1, "no-done:open=true": 0.1}  # fmt: skip
    options = Options(calibrate=False, concurrency=[8], requests=120, output_tokens="20", fake_gap=0.001,
                      fake_faults=faults, seed=5)  # fmt: skip
    results = run(options, str(tmp_path))
    injected = results["fake_provider"]["faults"]
    kinds = ("reset", "http-500", "error-event", "close", "cut", "no-done")
    assert all(injected.get(kind, 0) >= 3 for kind in kinds), injected
    outcomes = results["points"][0]["summary"]["outcomes"]
    broken = injected["reset"] + injected["close"]
    ok = 120 - broken - injected["http-500"] - injected["error-event"] - injected["cut"]
    assert outcomes == {"ok": ok, "connection": broken, "http_error": injected["http-500"],
                        "stream_error": injected["error-event"], "incomplete": injected["cut"]}  # fmt: skip
    records = _records(tmp_path)
    assert {r["error"] for r in records if r["outcome"] == "http_error"} == {"HTTP 500"}
    assert all(r["chunks"] == 4 for r in records if r["outcome"] in ("connection", "stream_error", "incomplete"))
    assert all(r["chunks"] == 20 and r["e2e"] < 5 for r in records if r["outcome"] == "ok")


def test_an_out_directory_holding_an_earlier_run_is_refused_and_left_as_it_was(tmp_path):
    """`-o` naming an earlier run's directory overwrote its records without a word."""
    (tmp_path / "records.jsonl").write_text('{"id": 0}\n')
    cli = subprocess.run(ISOPOOL + ["loadtest", "-c", "1", "-n", "1", "--no-calibrate", "-o", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cli.returncode == 2 and f"{tmp_path} holds an earlier run (records.jsonl)" in cli.stderr, cli.stderr
    assert os.listdir(tmp_path) == ["records.jsonl"] and (tmp_path / "records.jsonl").read_text() == '{"id": 0}\n'


def test_ctrl_c_before_any_request_ended_says_there_is_nothing_to_report(tmp_path):
    """It named records.jsonl and `loadtest report`, which then failed: no record yet (a review's finding)."""
    from broker.loadtest.cli import _kept

    out = tmp_path / "run"
    out.mkdir()
    assert _kept(str(out)) == "no request had ended: nothing to report"
    (out / "records.jsonl").write_text("")
    assert _kept(str(out)) == "no request had ended: nothing to report"
    (out / "records.jsonl").write_text('{"id": 1}\n')
    assert _kept(str(out)).startswith(f"what ran is in {out / 'records.jsonl'}")
