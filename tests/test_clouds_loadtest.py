"""A load test through a cloud profile (issue 20, step 8): `isopool loadtest --cloud bedrock` against the
fake's Bedrock routes: each request signed in its worker (the fake verifies the SigV4 signatures of
the test key), its event-stream frames timed as they arrive and their tokens counted, and a stream
that stalls after output cut at its stale timeout and counted as a stall."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .cloudkit import TEST_AWS_KEY, needs_clouds

pytestmark = [needs_clouds, pytest.mark.xdist_group(__name__)]  # its module-scoped pool on one worker

ISOPOOL = [sys.executable, "-c", "from broker.cli import main; main()"]


def test_a_short_load_test_through_a_bedrock_profile_counts_tokens_and_stalls(tmp_path, own_processes):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_ACCESS_KEY_ID": TEST_AWS_KEY[0], "AWS_SECRET_ACCESS_KEY": TEST_AWS_KEY[1],
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}  # fmt: skip
    args = ["loadtest", "--cloud", "bedrock", "--no-calibrate", "-c", "4", "-n", "16", "--output-tokens", "12",
            "--stale-timeout", "0.5", "--fault-rate", "stall-ping:after=5=0.25", "--seed", "4", "--json",
            "-o", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(ISOPOOL + args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    summary = results["points"][0]["summary"]
    stalled = results["fake_provider"]["faults"].get("stall-ping", 0)
    assert stalled >= 1 and summary["outcomes"] == {"ok": 16 - stalled, "stall": stalled}
    # after=5 events of a Messages stream: message_start, content_block_start, ping, then 2 tokens
    assert summary["stalls"]["after_tokens"] == [2] * stalled
    with open(tmp_path / "out" / "records.jsonl") as f:
        ok = [r for r in map(json.loads, f) if r["outcome"] == "ok"]
    assert len(ok) == 16 - stalled and all(r["output_tokens"] == r["chunks"] == 12 for r in ok)
