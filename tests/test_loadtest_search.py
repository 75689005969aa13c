"""`isopool loadtest --find-max`: the search for the highest load whose goodput meets a bar, against a
fake provider that slows under load (its ttft and gap grow per answer in progress beyond a knee), so the
answer is known from the fake's model; and the search's choice of the next probe, without processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import msgspec
import pytest
from click.testing import CliRunner

from broker.cli import main
from broker.loadtest import Options, rebuild, run
from broker.loadtest.measure import Measurement
from broker.loadtest.report import save_outputs
from broker.loadtest.search import Search, conclude, next_load
from broker.loadtest.summary import point_result
from broker.protocol import TICK, Tick

from .conftest import wait_for

ISOPOOL = [sys.executable, "-c", "from broker.cli import main; main()"]
TTFT, GAP, TOKENS = 0.08, 0.004, 10
# chat streams a role chunk at ttft, then each of its TOKENS pieces, the finish, the usage and [DONE] one gap apart
SERVED = TTFT + (TOKENS + 3) * GAP


def _probes(search: Search, threshold: float) -> list[tuple[float, bool]]:
    """The probes the search makes against a target that passes at and below `threshold`."""
    probes: list[tuple[float, bool]] = []
    while (load := next_load(search, probes)) is not None:
        probes.append((load, load <= threshold))
    return probes


def _point(over: str, load: float, share: float, verdict: str = "the generator kept up") -> dict:
    """A hand-made point: only what the search reads."""
    goodput = {"slo": {"ttft": 0.5}, "requests": round(share * 100), "share": share, "requests_per_s": 1.0}
    summary = {"requests": 100, "goodput": goodput}
    return {"load": {over: load}, "summary": summary, "generator": {"verdict": verdict}}


def test_the_search_grows_geometrically_then_bisects_to_its_precision():
    rate = Search(over="rate", start=1.0, precision=0.05)
    probes = _probes(rate, 12.5)
    assert [load for load, _ in probes[:5]] == [1, 2, 4, 8, 16]  # doubling until the first failure
    passed = max(load for load, ok in probes if ok)
    failed = min(load for load, ok in probes if not ok)
    assert 12.5 / 1.05 <= passed <= 12.5 < failed <= passed * 1.05
    assert len(probes) <= rate.max_probes
    concurrency = Search(over="concurrency", start=2)
    assert [load for load, _ in _probes(concurrency, 9)] == [2, 4, 8, 16, 11, 9, 10]  # whole streams
    assert next_load(concurrency, [(9, True), (10, False)]) is None  # nothing between 9 and 10


def test_the_search_stops_at_its_bounds_and_goes_down_from_a_failing_start():
    assert [load for load, _ in _probes(Search(over="rate", start=4, limit=20), 1000)] == [4, 8, 16, 20]
    assert [load for load, _ in _probes(Search(over="concurrency", start=8), 2)] == [8, 4, 2, 3]
    assert [load for load, _ in _probes(Search(over="concurrency", start=4), 0)] == [4, 2, 1]  # none passes
    assert len(_probes(Search(over="rate", max_probes=5, precision=0.001), 7.77)) == 5  # the probe budget


def test_the_conclusion_names_the_answer_its_bracket_and_a_lower_bound():
    search = Search(over="rate", start=4, precision=0.1)
    slo = {"ttft": 0.5, "tpot": 0.05}
    points = [_point("rate", 4, 1.0), _point("rate", 8, 0.5), _point("rate", 5.66, 0.97), _point("rate", 6.73, 0.9),
              _point("rate", 6.17, 0.96)]  # fmt: skip
    found = conclude(search, slo, points)
    assert found["answer"] == 6.17 and found["done"] and not found["lower_bound"] and not found["may_overstate"]
    assert (found["passed"]["load"], found["failed"]["load"]) == (6.17, 6.73)
    assert found["text"][0] == "highest rate meeting ttft<=500ms, tpot<=50ms for 95% of requests: 6.17 req/s"
    assert found["text"][1] == ("between 6.17 req/s (96% of 100 requests good), which passed, "
                                "and 6.73 req/s (90% of 100 requests good), which failed")  # fmt: skip
    slow = "the generator was the limit: its event loop lagged 80 ms (p99)"
    failing_limited = conclude(search, slo, [*points[:3], _point("rate", 6.73, 0.9, slow), points[4]])
    assert failing_limited["lower_bound"] and not failing_limited["may_overstate"]
    assert "at 6.73 req/s, where the bar failed, so the failure may be its own and the answer is a lower bound: " \
           "its event loop lagged 80 ms (p99)" in failing_limited["text"][2]  # fmt: skip
    passing_limited = conclude(search, slo, [*points[:4], _point("rate", 6.17, 0.96, slow)])
    assert passing_limited["may_overstate"] and not passing_limited["lower_bound"]
    assert "at 6.17 req/s, where the bar passed" in passing_limited["text"][2]
    unfinished = conclude(search, slo, points[:3])
    assert not unfinished["done"] and any("before the search" in line for line in unfinished["text"])
    none = conclude(Search(over="concurrency", start=1), slo, [_point("concurrency", 1, 0.2)])
    assert none["answer"] is None and "even 1" in none["text"][0]


def test_find_max_finds_the_highest_rate_the_slowing_fake_serves_within_the_slo(tmp_path, own_processes):
    # Beyond `knee` answers in progress the fake slows to twice its ttft and more (unstable: the queue grows),
    # so the 200 ms ttft is met while an arrival finds at most `knee` answers in progress, itself included:
    # under constant arrivals, up to knee / SERVED, about 30/s. On a busy machine one answer that runs late
    # starts the queue sooner, hence the wide lower margin; a bar of 90% lets a probe of 16-30 requests pass
    # through a hiccup in one or two of them.
    knee, precision, bar = 4, 0.1, 0.9
    threshold = knee / SERVED
    options = Options(calibrate=False, arrival="constant", duration=1.2, warmup=0.2, output_tokens=str(TOKENS),
                      fake_ttft=TTFT, fake_gap=GAP, fake_load_knee=knee, fake_load_slope=1.0, slo="ttft=200ms",
                      find_max=Search(over="rate", goodput=bar, start=16, limit=40, precision=precision))  # fmt: skip
    results = run(options, str(tmp_path))
    found = results["search"]
    assert found["done"], found["text"]
    assert 0.6 * threshold / (1 + precision) <= found["answer"] <= threshold * 1.05, (found["text"], threshold)
    probed = [p["load"]["rate"] for p in results["points"]]
    assert probed[:2] == [16, 32] and len(set(probed)) == len(probed)
    shares = {p["load"]["rate"]: p["summary"]["goodput"]["share"] for p in results["points"]}
    assert shares[found["answer"]] >= bar
    above = min(load for load in probed if load > found["answer"])
    assert shares[above] < bar and above <= found["answer"] * (1 + precision)
    assert found["failed"]["load"] == above
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert [p["load"]["rate"] for p in saved["points"]] == probed and saved["search"] == found
    assert [p["load"] for p in saved["points"]] == saved["load_points"]
    save_outputs(results, str(tmp_path))
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["goodput_share"]) for r in rows] == [shares[load] for load in probed]
    with open(tmp_path / "search.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert rebuild(str(tmp_path))["search"]["answer"] == found["answer"]


def test_find_max_over_concurrency_from_the_cli_and_its_report(tmp_path, own_processes):
    # c streams in progress beyond the knee of 8 take (1 + c - 8) times the fake's ttft: 9 see 408 ms, 10 see 612 ms
    ttft, knee = 0.2, 8
    known = max(c for c in range(1, 13) if (1 + max(0, c - knee)) * (ttft + GAP) <= 0.5)
    out = str(tmp_path / "run")
    args = ["--find-max", "concurrency", "--slo", "ttft=500ms", "--start", "4", "--max", "12", "--duration", "1",
            "--warmup", "0.2", "--output-tokens", str(TOKENS), "--fake-ttft", str(ttft), "--fake-gap", str(GAP),
            "--fake-load-knee", str(knee), "--fake-load-slope", "1", "--no-calibrate", "-o", out]  # fmt: skip
    done = CliRunner().invoke(main, ["loadtest", *args])
    assert done.exit_code == 0, done.output
    answer = f"highest concurrency meeting ttft<=500ms for 95% of requests: {known} streams"
    assert answer in _flat(done.output), done.output
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert [p["load"]["concurrency"] for p in results["points"]] == [4, 8, 12, 10, 9]
    report = CliRunner().invoke(main, ["loadtest", "report", out])
    assert report.exit_code == 0 and "c=12" in report.output, report.output
    assert answer in _flat(report.output) and f"and {known + 1} streams" in _flat(report.output)


def _flat(output: str) -> str:
    """Console output with its line wrapping undone."""
    return " ".join(output.split())


def test_a_killed_search_keeps_its_probes_for_report(tmp_path, own_processes):
    out = str(tmp_path / "run")
    args = ["--find-max", "--slo", "ttft=1", "--start", "4", "--arrival", "constant", "--duration", "0.6",
            "--output-tokens", "5", "--no-calibrate", "-o", out]  # fmt: skip
    proc = subprocess.Popen(ISOPOOL + ["loadtest", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(_saved_points(out)) >= 2, 60, "two probes to be written")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    report = CliRunner().invoke(main, ["loadtest", "report", out, "--json"])
    assert report.exit_code == 0, report.output
    rebuilt = json.loads(report.output)
    assert [p["load"]["rate"] for p in rebuilt["points"][:2]] == [4, 8]
    assert all(p["summary"]["goodput"]["share"] == 1.0 for p in rebuilt["points"][:2])
    assert not rebuilt["search"]["done"] and rebuilt["search"]["answer"] >= 8
    assert any("before the search" in line for line in rebuilt["search"]["text"])


def _saved_points(out: str) -> list:
    try:
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)["points"]
    except (OSError, ValueError):
        return []


@pytest.mark.parametrize(
    "args,error",
    [
        (["--find-max"], "--find-max needs --slo"),
        (["--find-max", "--slo", "ttft=1", "--rate", "2,4"], "leave out --rate"),
        (["--find-max", "concurrency", "--slo", "ttft=1", "-c", "8"], "leave out --rate"),
        (["--slo", "ttft=1", "--goodput", "0.9"], "give --find-max"),
        (["--find-max", "--slo", "ttft=1", "--goodput", "95"], "goodput"),
        (["--find-max", "concurrency", "--slo", "ttft=1", "--start", "1.5"], "whole"),
        (["--find-max", "--slo", "ttft=1", "--start", "10", "--max", "5"], "--max"),
        (["--fake-load-slope", "-1"], "cannot be negative"),
        (["--find-max", "concurrency", "--slo", "ttft=1", "--trace", __file__], "searches the trace's speedup"),
        (["--find-max", "--slo", "ttft=1", "--trace", __file__, "--speedup", "2"], "leave out --speedup"),
    ],
)
def test_bad_find_max_options_are_refused_with_what_to_do(args, error):
    refused = CliRunner().invoke(main, ["loadtest", *args])
    assert refused.exit_code == 2 and error in refused.output, refused.output


def test_find_max_over_a_trace_finds_the_highest_speedup_the_slowing_fake_serves(tmp_path, own_processes):
    """A public-format trace replayed at rising speed: one command gives the fastest replay (so the highest
    rate of that trace's shape) that meets the SLO. The trace sends 10 requests/s at its own speed, so the
    fake's threshold of knee / SERVED requests/s (see the rate search above) is a speedup of a tenth of it."""
    trace = tmp_path / "trace.jsonl"
    with open(trace, "w") as f:
        for i in range(120):  # 12 s at its own speed: every probe is cut by --duration before it ends
            f.write(json.dumps({"timestamp": 100 * i, "input_length": 20, "output_length": TOKENS, "hash_ids": [i]}))
            f.write("\n")
    knee, precision, bar = 4, 0.1, 0.9
    threshold = knee / SERVED / 10
    result = CliRunner().invoke(main, [
        "loadtest", "--trace", str(trace), "--find-max", "--slo", "ttft=200ms", "--goodput", str(bar),
        "--start", "1.6", "--max", "4", "--precision", str(precision), "--duration", "1.2", "--warmup", "0.2",
        "--fake-ttft", str(TTFT), "--fake-gap", str(GAP), "--fake-load-knee", str(knee), "--fake-load-slope", "1",
        "--no-calibrate", "--json", "-o", str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads(result.output[result.output.index("{") :])
    found = results["search"]
    assert found["over"] == "speedup" and found["done"], found["text"]
    assert 0.6 * threshold / (1 + precision) <= found["answer"] <= threshold * 1.05, (found["text"], threshold)
    probed = [p["load"]["speedup"] for p in results["points"]]
    assert probed[:2] == [1.6, 3.2] and all(p["load"]["trace"] == "trace.jsonl" for p in results["points"])
    with open(tmp_path / "run" / "records.jsonl") as f:
        records = [json.loads(line) for line in f]
    for number, speedup in enumerate(probed):  # each probe replays the trace's first --duration seconds at its speed
        due = sorted(r["scheduled"] for r in records if r["point"] == number)
        assert due[0] == 0 and len(due) == 1 + int(1.2 * 10 * speedup - 1e-9), (speedup, len(due))
        assert due[-1] == pytest.approx((len(due) - 1) * 0.1 / speedup, abs=1e-5)
    assert found["text"][0].endswith(f"the trace at {found['answer']:g}x its speed")


def test_under_an_open_loop_the_slo_counts_from_when_a_request_was_due():
    """Requests that waited 2 s for a --max-concurrency slot, then got their first token 50 ms after they were
    sent: under a rate they missed a 500 ms TTFT (a search had found 8 req/s for a target that served 1.4
    with one slot); under a closed loop, where a request is due when its lane frees, they met it."""
    ms = 1_000_000
    records = []
    for i in range(10):
        due = (i + 1) * 100 * ms  # from the origin, 0: a time of 0 means none
        sent = due + 2000 * ms
        m = Measurement(i, due, sent, 8, 2)
        m.tick(TICK, msgspec.msgpack.encode(Tick(sent + 40 * ms, sent=sent, status=200)))
        m.observe(sent + 50 * ms, 1)
        m.observe(sent + 60 * ms, 1, output_tokens=2)
        m.finish(sent + 60 * ms)
        records.append(m.record(0, 0, False))
    slo = {"ttft": 0.5}
    rate = point_result({"rate": 10.0, "max_concurrency": 1, "arrival": "constant"}, records, [], [], slo)
    closed = point_result({"concurrency": 1}, records, [], [], slo)
    assert rate["summary"]["goodput"]["share"] == 0.0 and closed["summary"]["goodput"]["share"] == 1.0


@pytest.mark.parametrize("value", ["nan", "inf", "-5"])
def test_numbers_that_are_not_numbers_are_refused(value):
    """NaN compares false with everything, so `speedup <= 0` let it through to a traceback mid-run."""
    for args in (["--slo", f"ttft={value}"], ["--find-max", "--slo", "ttft=1", "--start", value],
                 ["--server-metrics", "target", "--server-metrics-interval", value]):  # fmt: skip
        refused = CliRunner().invoke(main, ["loadtest", "--no-calibrate", *args])
        assert refused.exit_code == 2, (args, refused.output)
    with pytest.raises(ValueError, match="--speedup must be a (finite )?number"):
        Options(calibrate=False, trace=__file__, speedup=float(value))
