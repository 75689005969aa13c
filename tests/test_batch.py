"""Batch jobs: provider batch files through the pool, exactly once per custom_id, resumable
after SIGKILL, both formats in and out, invalid input refused with line numbers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import openai
import pytest

from broker import Pool
from broker.batch import BatchInputError, iter_results, run
from broker.fake_provider import FakeProviderProcess
from broker.fake_provider.server import Latency

from .conftest import TEST_SETTINGS, profiles, sdk_has, wait_for

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

ISOPOOL = os.path.join(os.path.dirname(sys.executable), "isopool")


# first_event_timeout catches stall-first quickly; stale_timeout the stalls after events.
LIMITS = dict(first_event_timeout=3.0, stale_timeout=0.5)


@pytest.fixture(scope="module")
def pool(fake):
    settings = dict(TEST_SETTINGS, **LIMITS, max_attempts=5)
    with Pool(profiles=profiles(fake.url, min_workers=2, max_workers=16), **settings) as p:
        yield p


def openai_lines(n: int, model: str = "gpt-fake", start: int = 0) -> list[dict]:
    return [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]}}
        for i in range(start, start + n)
    ]  # fmt: skip


def anthropic_lines(n: int, model: str = "claude-fake") -> list[dict]:
    return [
        {"custom_id": f"msg-{i}",
         "params": {"model": model, "max_tokens": 24, "messages": [{"role": "user", "content": f"question {i}"}]}}
        for i in range(n)
    ]  # fmt: skip


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def bodies(records: list[dict]) -> dict[str, object]:
    """custom_id -> what the provider answered (request ids differ from run to run)."""
    out = {}
    for r in records:
        out[r["custom_id"]] = r["result"] if "result" in r else (r["response"] or {}).get("body")
    return out


def test_500_requests_with_injected_stalls_and_errors_each_answered_once(tmp_path, fake, pool):
    # as many faults as 1000 requests met at half these rates, in half the time (stall-first's kept: twice
    # on one line is a failure)
    rates = {"stall-ping:after=2,interval=0.05": 0.06, "stall-first:interval=0.05": 0.02,
             "reset:after=2": 0.02, "http-500": 0.04}  # fmt: skip
    lines = openai_lines(490) + openai_lines(10, model="gpt-fake@http-529:times=99", start=490)
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    clean = run(source, str(tmp_path / "clean.jsonl"), pool=pool, concurrency=32, retry_budget=1)
    assert clean.ok == 490 and clean.failed == 10
    with FakeProviderProcess(rates=rates, seed=3) as faulty:
        # each 529 line's six attempts are backed off from 0.05 s, not 0.5 s: the lane, halved to one
        # line at a time by the throttles, would otherwise wait minutes for them
        settings = dict(TEST_SETTINGS, **LIMITS, max_attempts=6)
        with Pool(profiles=profiles(faulty.url, min_workers=4, max_workers=32), **settings) as faulty_pool:
            summary = run(source, str(tmp_path / "out.jsonl"), pool=faulty_pool, concurrency=32, retry_budget=1)
        injected = faulty.stats()["faults"]
    results = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in lines)  # exactly once
    assert sum(injected.values()) > 50 and summary.stalls_recovered > 15
    # The fake draws its faults for each attempt anew, so a line can meet http-500 on all six of its
    # attempts (rarely), or a silent provider (stall-first) twice, which the pool retries only once
    # (p ~ 1e-3 a line): that line fails, rightly, as a 500 or attempts_exhausted.
    unlucky = {r["custom_id"] for r in results if (r["response"] or {}).get("status_code") == 500}
    unlucky |= {r["custom_id"] for r in results if (r.get("error") or {}).get("code") == "attempts_exhausted"}
    assert len(unlucky) <= 4 and summary.ok == 490 - len(unlucky) and summary.failed == 10 + len(unlucky)
    clean_bodies = bodies(read_jsonl(tmp_path / "clean.jsonl"))
    assert {k: v for k, v in bodies(results).items() if k not in unlucky} == {
        k: v for k, v in clean_bodies.items() if k not in unlucky
    }  # byte for byte what a clean run says
    overloaded = [r for r in results if int(r["custom_id"].split("-")[1]) >= 490]
    assert all(r["response"]["status_code"] == 529 for r in overloaded)
    assert all(r["response"]["body"]["error"]["type"] == "overloaded_error" for r in overloaded)


def test_sigkill_at_random_points_then_resume_gives_each_id_once(tmp_path):
    # ~150 ms per request, so that the kills land in the middle of the run
    with FakeProviderProcess(Latency(ttft=0.05, gap=0.005, tokens=20)) as slow:
        with Pool(profiles=profiles(slow.url, min_workers=8, max_workers=8), **TEST_SETTINGS) as pool:
            source = write_jsonl(tmp_path / "in.jsonl", anthropic_lines(200))
            reference = tmp_path / "reference.jsonl"
            run(source, str(reference), pool=pool, concurrency=8)
            out = tmp_path / "out.jsonl"
            command = [ISOPOOL, "batch", source, "-o", str(out), "--pool", pool.url, "-c", "8", "--json"]
            rng = random.Random(5)
            done_before_kill = []
            for _ in range(4):
                runner = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                # killed a random few lines into its run (not after a fixed time: a loaded machine may
                # take longer than that to start it), a random fraction of a line's time later
                target = _complete_lines(out) + rng.randint(3, 15)
                wait_for(lambda t=target, r=runner: _complete_lines(out) >= t or r.poll() is not None, 60, "lines")
                time.sleep(rng.uniform(0, 0.2))
                runner.send_signal(signal.SIGKILL)
                runner.wait()
                done_before_kill.append(_complete_lines(out))
                with open(out, "ab") as f:  # a torn last line, as a kill in the middle of a write leaves it
                    f.write(b'{"custom_id": "msg-torn", "res')
            final = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert summary["repaired_bytes"] > 0 and summary["already_done"] > 0
    assert 0 < done_before_kill[0] < 200 and done_before_kill == sorted(done_before_kill)  # killed mid-run
    results = read_jsonl(out)
    ids = [r["custom_id"] for r in results]
    assert len(ids) == len(set(ids)) == 200
    assert bodies(results) == bodies(read_jsonl(reference))


def test_ctrl_c_says_what_was_kept_and_the_same_command_sends_the_rest(tmp_path):
    """Ctrl-C printed click's bare "Aborted!" (exit 1): nothing said the results were kept, or how to go on,
    and a shell script running batches in a loop went on to the next."""
    with FakeProviderProcess(Latency(ttft=0.05, gap=0.005, tokens=20)) as slow:
        with Pool(profiles=profiles(slow.url, min_workers=4, max_workers=4), **TEST_SETTINGS) as pool:
            source = write_jsonl(tmp_path / "in.jsonl", anthropic_lines(60))
            out = tmp_path / "out.jsonl"
            command = [ISOPOOL, "batch", source, "-o", str(out), "--pool", pool.url, "-c", "4"]
            runner = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            wait_for(lambda: _complete_lines(out) >= 5 or runner.poll() is not None, 60, "lines")
            runner.send_signal(signal.SIGINT)
            _, err = runner.communicate(timeout=60)
            kept = _complete_lines(out)
            final = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    assert runner.returncode == -signal.SIGINT, err  # as killed by it: a shell's loop stops (exit 130 let it go on)
    assert f"interrupted: the results written so far stay in {out}; run the same command again" in err, err
    assert "Traceback" not in err and "Aborted" not in err, err
    assert 5 <= kept < 60
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout)["already_done"] == kept
    ids = [r["custom_id"] for r in read_jsonl(out)]
    assert len(ids) == len(set(ids)) == 60


_SLOW_JOB = """
import pathlib, time

def run(line, ctx):
    with open(pathlib.Path(__file__).with_name("started"), "a") as f:
        f.write(ctx.custom_id + "\\n")
    time.sleep(2)
    return {"done": ctx.custom_id}
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_of_a_threaded_job_writes_what_ends_and_a_second_leaves_it(tmp_path, pool, presses):
    """Jobs running in threads cannot be stopped: Ctrl-C waited for them saying nothing and then dropped
    their results, which a rerun paid for again (a review's finding). Now it says it waits and writes them;
    a second Ctrl-C leaves at once."""
    (tmp_path / "slowjob.py").write_text(_SLOW_JOB)
    source = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": f"job-{i}", "x": i} for i in range(6)])
    out = tmp_path / "out.jsonl"
    command = [ISOPOOL, "batch", source, "-o", str(out), "--job", "slowjob:run", "--pool", pool.url, "-c", "2"]
    runner = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = tmp_path / "started"
    wait_for(lambda: started.exists() and started.read_text().count("\n") == 2, 60, "two jobs to start")
    sent = time.monotonic()
    runner.send_signal(signal.SIGINT)
    if presses == 2:
        time.sleep(0.5)
        runner.send_signal(signal.SIGINT)
    _, err = runner.communicate(timeout=60)
    took = time.monotonic() - sent
    assert runner.returncode == -signal.SIGINT, err
    assert "Ctrl-C: waiting for the 2 jobs running to end, to write their results" in err, err
    assert "Traceback" not in err, err
    if presses == 1:
        assert _complete_lines(out) == 2, err
        assert f"interrupted: the results written so far stay in {out}" in err, err
    else:
        assert took < 1.5, took  # not the jobs' 2 s
        assert _complete_lines(out) == 0, err
        assert f"interrupted: no result was written to {out} yet; run the same command again to start" in err, err
    rerun = subprocess.run([*command, "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    ids = [r["custom_id"] for r in read_jsonl(out)]
    assert sorted(ids) == [f"job-{i}" for i in range(6)]
    assert started.read_text().count("\n") == (6 if presses == 1 else 8)  # run again only if unwritten


_FAST_JOB = """
import pathlib, random, time

def run(line, ctx):
    with open(pathlib.Path(__file__).with_name("started"), "a") as f:
        f.write(ctx.custom_id + "\\n")
    time.sleep(random.random() / 1000)
    return {"done": ctx.custom_id}
"""


def test_one_ctrl_c_among_quick_jobs_writes_every_job_that_ran(tmp_path, pool):
    """The Ctrl-C of the fix above often landed between a job's end and its line, and that result was lost:
    a rerun ran (and paid for) it again (a review: 1 to 23 of them in 24 of 25 tries)."""
    (tmp_path / "fastjob.py").write_text(_FAST_JOB)
    lines = 3000
    source = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": f"job-{i}", "x": i} for i in range(lines)])
    out = tmp_path / "out.jsonl"
    command = [ISOPOOL, "batch", source, "-o", str(out), "--job", "fastjob:run", "--pool", pool.url, "-c", "16"]
    runner = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: _complete_lines(out) >= 300 or runner.poll() is not None, 60, "jobs to be written")
    runner.send_signal(signal.SIGINT)
    _, err = runner.communicate(timeout=60)
    started = tmp_path / "started"
    assert runner.returncode == -signal.SIGINT, err
    ran, written = started.read_text().count("\n"), _complete_lines(out)
    assert ran == written < lines, (ran, written)
    rerun = subprocess.run([*command, "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["already_done"] == written
    assert started.read_text().count("\n") == lines  # no job ran twice


def _complete_lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_result_lines_follow_the_providers_documented_schemas(tmp_path, pool):
    anthropic_in = anthropic_lines(2)
    anthropic_in.append({"custom_id": "msg-bad", "params": {"model": "claude-fake@http-529:times=9",
                         "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}})  # fmt: skip
    out = tmp_path / "anthropic.jsonl"
    run(write_jsonl(tmp_path / "a.jsonl", anthropic_in), str(out), pool=pool, retry_budget=0)
    by_id = {r["custom_id"]: r for r in read_jsonl(out)}
    ok = by_id["msg-0"]
    assert set(ok) == {"custom_id", "result"} and ok["result"]["type"] == "succeeded"
    message = ok["result"]["message"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["stop_reason"] == "end_turn"
    assert message["content"][0]["type"] == "text" and set(message["usage"]) >= {"input_tokens", "output_tokens"}
    bad = by_id["msg-bad"]["result"]
    assert bad["type"] == "errored" and bad["error"]["type"] == "error"
    assert bad["error"]["error"]["type"] == "overloaded_error" and bad["error"]["error"]["message"]

    openai_in = openai_lines(1) + [
        {"custom_id": "emb", "method": "POST", "url": "/v1/responses", "body": {"model": "gpt-fake", "input": "hi"}},
        *openai_lines(1, model="gpt-fake@http-529:times=9", start=7),
    ]
    out = tmp_path / "openai.jsonl"
    run(write_jsonl(tmp_path / "o.jsonl", openai_in), str(out), pool=pool, retry_budget=0)
    by_id = {r["custom_id"]: r for r in read_jsonl(out)}
    ok = by_id["req-0"]
    assert set(ok) == {"id", "custom_id", "response", "error"} and ok["error"] is None
    assert ok["id"].startswith("batch_req_") and ok["response"]["status_code"] == 200
    assert ok["response"]["request_id"].startswith("req_fake_")
    assert ok["response"]["body"]["object"] == "chat.completion"
    if sdk_has("responses"):
        assert by_id["emb"]["response"]["body"]["object"] == "response"
    else:  # the pool's openai predates the Responses API: the line fails saying so
        assert f"openai {openai.__version__} has no 'responses'" in by_id["emb"]["error"]["message"]
    failed = by_id["req-7"]
    assert failed["response"]["status_code"] == 529 and failed["error"] is None


def test_invalid_lines_are_reported_with_line_numbers_and_nothing_is_sent(tmp_path, fake, pool):
    good = openai_lines(2)
    text = "\n".join(
        [
            json.dumps(good[0]),
            "{not json",
            json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
            json.dumps(good[0]),
            json.dumps({**good[1], "url": "/v1/images"}),
            json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/chat/completions"}),
        ]
    )
    source = tmp_path / "bad.jsonl"
    source.write_text(text + "\n")
    served = sum(fake.stats()["served"].values())
    with pytest.raises(BatchInputError) as caught:
        run(str(source), str(tmp_path / "out.jsonl"), pool=pool)
    message = str(caught.value)
    for expected in (":2: malformed JSON", ":3: missing custom_id", ":4: duplicate custom_id 'req-0' (first on line 1)",
                     ":5: unknown url '/v1/images'", ":6: missing body"):  # fmt: skip
        assert expected in message, message
    assert sum(fake.stats()["served"].values()) == served and not (tmp_path / "out.jsonl").exists()

    cli = subprocess.run([ISOPOOL, "batch", str(source), "-o", str(tmp_path / "out.jsonl"), "--pool", pool.url],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cli.returncode == 2 and ":5: unknown url" in cli.stderr

    summary = run(str(source), str(tmp_path / "out.jsonl"), pool=pool, skip_invalid=True)
    results = {r["custom_id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert summary.ok == 1 and summary.invalid == 5
    assert set(results) == {"req-0", "line-2", "line-3", "req-1", "nobody"}  # the duplicate is reported, not rewritten
    assert results["req-1"]["error"]["code"] == "invalid" and "line 5" in results["req-1"]["error"]["message"]


def test_python_api_iterates_results_as_they_are_written(tmp_path, pool):
    source = write_jsonl(tmp_path / "in.jsonl", anthropic_lines(20))
    seen = [r["custom_id"] for r in iter_results(source, str(tmp_path / "out.jsonl"), pool=pool, concurrency=4)]
    assert sorted(seen) == sorted(f"msg-{i}" for i in range(20))
    again = list(iter_results(source, str(tmp_path / "out.jsonl"), pool=pool))
    assert again == []  # everything was already done


def test_progress_lines_when_not_a_terminal(tmp_path, pool):
    source = write_jsonl(tmp_path / "in.jsonl", openai_lines(30))
    out = subprocess.run([ISOPOOL, "batch", source, "-o", str(tmp_path / "o.jsonl"), "--pool", pool.url],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "batch: 30/30 done" in out.stdout and "isopool batch summary" in out.stdout


def test_429_storm_lowers_concurrency_and_every_request_stays_within_its_budget(tmp_path):
    """Half of all HTTP attempts are throttled; the pool does not retry here (max_attempts=1),
    so every 429 reaches the runner, which halves its concurrency and re-sends."""
    budget = 4
    with FakeProviderProcess(rates={"http-429:retry_after=0": 0.5}, seed=11) as storm:
        pool_profiles = profiles(storm.url, min_workers=2, max_workers=16)
        with Pool(profiles=pool_profiles, **{**TEST_SETTINGS, "max_attempts": 1}) as pool:
            source = write_jsonl(tmp_path / "in.jsonl", openai_lines(120))
            summary = run(source, str(tmp_path / "out.jsonl"), pool=pool, concurrency=16, retry_budget=budget)
        served = sum(storm.stats()["served"].values())
    results = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(120))
    assert summary.throttled > 30 and summary.lowest_concurrency < 16
    assert served <= 120 * (budget + 1) and summary.batch_retries == summary.throttled - summary.failed
    failures = [r for r in results if r["response"]["status_code"] != 200]
    assert all(r["response"]["status_code"] == 429 for r in failures)
    assert summary.ok + summary.failed == 120 and summary.ok >= 110


def test_lane_holds_requests_to_the_rpm_and_tpm_ceilings(monkeypatch):
    """The sliding-window ceilings, on a clock the test moves (a unit test of the lane)."""
    import asyncio

    from broker.batch import lane as lane_module

    now = [1000.0]
    monkeypatch.setattr(lane_module.time, "monotonic", lambda: now[0])

    async def scenario():
        lane = lane_module.Lane(ceiling=50, rpm=3, tpm=1000)
        for _ in range(3):
            await lane.acquire(tokens=100)
        assert lane._ceiling_wait(now[0], 100) == pytest.approx(60.0)  # a 4th request waits for the window
        now[0] += 61
        assert lane._ceiling_wait(now[0], 100) == 0
        await lane.acquire(tokens=900)  # 900 tokens now in the window
        assert lane._ceiling_wait(now[0], 200) == pytest.approx(60.0)  # 1,100 > tpm until it leaves
        assert lane._ceiling_wait(now[0], 100) == 0

    asyncio.run(scenario())


def test_a_ray_node_whose_pool_does_not_start_in_time_is_told_apart_from_a_failure(monkeypatch):
    """asyncio's timeout has no message: the left-out node's reason read "TimeoutError: " (seen at load 6, where
    three nodes' pools took over 120 s). A unit test of the wait, on an actor call that never answers."""
    import asyncio

    from broker.batch import cluster

    monkeypatch.setattr(cluster, "NODE_START_TIMEOUT", 0.05)
    with pytest.raises(TimeoutError) as caught:
        asyncio.run(cluster.node_started(asyncio.sleep(10)))
    assert cluster.short_error(caught.value) == "TimeoutError: no answer within 0.05 s (is the node overloaded?)"
