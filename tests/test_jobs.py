"""Agent functions as batch jobs: a multi-turn tool-using agent per line, every model call
through the pool, stalled turns retried at that call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from broker import Pool
from broker.batch import run_job
from examples.weather_agent import run as weather_agent

from .conftest import TEST_SETTINGS, profiles

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

ISOPOOL = os.path.join(os.path.dirname(sys.executable), "isopool")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STALL = {"x-isopool-fault": "stall-ping:after=2,interval=0.05"}


@pytest.fixture(scope="module")
def pool(fake):
    settings = dict(TEST_SETTINGS, first_event_timeout=3.0, stale_timeout=0.5)
    with Pool(profiles=profiles(fake.url, min_workers=2, max_workers=8), **settings) as p:
        yield p


def questions(tmp_path, name, stall_every=0):
    lines = []
    for i in range(12):
        line = {"custom_id": f"q{i}", "question": f"What is the weather in city{i}?"}
        if stall_every and i % stall_every == 0:
            line["extra_headers"] = STALL  # every turn of this run stalls once, then its retry answers
        lines.append(line)
    path = tmp_path / name
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def outputs(path):
    return {r["custom_id"]: r["result"] for r in map(json.loads, open(path))}


def test_agent_runs_finish_with_the_right_answer_when_turns_stall(tmp_path, pool):
    clean = run_job(questions(tmp_path, "clean.jsonl"), str(tmp_path / "clean.out"), weather_agent, pool=pool)
    assert clean.ok == 12
    with pool.client() as client:
        stalls_before = sum(client.stats()["stalls"].values())
        summary = run_job(questions(tmp_path, "in.jsonl", stall_every=3), str(tmp_path / "out"), weather_agent,
                          pool=pool, concurrency=6)  # fmt: skip
        stalls = sum(client.stats()["stalls"].values()) - stalls_before
    assert summary.ok == 12 and summary.failed == 0
    assert stalls == 4 * 4  # four stalled runs, four turns each, each turn stalled once
    got, want = outputs(tmp_path / "out"), outputs(tmp_path / "clean.out")
    assert got == want and all(r["output"]["turns"] == 4 for r in got.values())


def test_coroutine_jobs_and_failures_are_recorded(tmp_path, pool):
    async def agent(line, ctx):
        if line["question"].endswith("city3?"):
            raise LookupError("no such city")
        reply = await ctx.anthropic.messages.create(
            model="claude-fake", max_tokens=16, messages=[{"role": "user", "content": line["question"]}]
        )
        return reply.content[0].text

    summary = run_job(questions(tmp_path, "in.jsonl"), str(tmp_path / "out"), agent, pool=pool, concurrency=4)
    results = outputs(tmp_path / "out")
    assert summary.ok == 11 and summary.failed == 1 and summary.errors == {"LookupError": 1}
    error = results["q3"]["error"]
    assert error["type"] == "LookupError" and error["message"] == "no such city"
    assert any("in agent" in frame for frame in error["traceback"])
    assert all(isinstance(r["output"], str) for cid, r in results.items() if cid != "q3")


def test_cli_job_from_the_examples_package(tmp_path, pool):
    out = tmp_path / "answers.jsonl"
    command = [ISOPOOL, "batch", "examples/questions.jsonl", "-o", str(out), "--pool", pool.url,
               "--job", "examples.weather_agent:run", "--json"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["ok"] == 3 and summary["tokens"] is None  # not counted (it said 0 / 0 for 12 calls)
    assert {r["result"]["output"]["turns"] for r in map(json.loads, open(out))} == {4}
    bad = subprocess.run([ISOPOOL, "batch", "examples/questions.jsonl", "-o", str(out), "--job", "examples.nope:run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "cannot load job" in bad.stderr
