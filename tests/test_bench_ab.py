"""bench.ab: two trees' pools measured in one run. Its arithmetic (blocks in a turning order, the difference
of two sides with an interval), and one short real run of this working tree against HEAD: both sides
start a real pool of their own tree, call the same fake provider through the shim, and end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bench.ab import ROOT, Side, difference
from bench.common import in_blocks


def test_blocks_turn_the_order_every_round():
    order = []

    def runner(name):
        return lambda n: order.append(name) or [0.001] * n

    out = in_blocks({"a": runner("a"), "b": runner("b"), "c": runner("c")}, 3, 2)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(rounds) for name, rounds in out.items()} == {"a": 3, "b": 3, "c": 3}


def test_a_difference_is_found_and_no_difference_holds_zero():
    theirs = [[0.001 + i * 1e-6 for i in range(50)] for _ in range(40)]
    slower = [[t + 0.0002 + (r % 5 - 2) * 2e-5 for t in block] for r, block in enumerate(theirs)]  # 0.16-0.24 ms
    mid, low, high = difference(slower, theirs)
    assert 0.16 <= low <= mid <= high <= 0.24 and mid == pytest.approx(0.2)
    noisy = [[t + (0.0001 if r % 2 else -0.0001) for t in block] for r, block in enumerate(theirs)]
    mid, low, high = difference(noisy, theirs)
    assert low <= 0 <= high


def _ab(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "bench.ab", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_a_commit_that_does_not_exist_is_named_before_anything_starts():
    run = _ab("no-such-commit-anywhere", timeout=60)
    assert run.returncode != 0
    assert "git archive no-such-commit-anywhere" in run.stderr
    run = _ab("--", "--output=/tmp/ab-escape.tar", timeout=60)  # an option, not a commit: refused, nothing written
    assert run.returncode != 0 and not os.path.exists("/tmp/ab-escape.tar")


@pytest.mark.skipif(subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode != 0,
                    reason="not a git checkout")  # fmt: skip
@pytest.mark.parametrize("path", ["shim", "gateway"])
def test_this_tree_against_head_runs_both_pools_and_prints_their_difference(path):
    run = _ab("HEAD", "--path", path, "--calls", "200", "--block", "50")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {m[1]: m[2].split() for m in re.finditer(r"^(direct SDK|this tree|HEAD) +([\d. ]+)$", run.stdout, re.M)}
    assert set(rows) == {"direct SDK", "this tree", "HEAD"}, run.stdout
    assert len(rows["direct SDK"]) == 3 and len(rows["this tree"]) == len(rows["HEAD"]) == 7  # + CPU of 4 roles
    for name, figures in rows.items():  # each side's pool did work (the gateway's column only on its path)
        assert all(float(x) > 0 for i, x in enumerate(figures) if i != 4), (name, run.stdout)
    assert (float(rows["HEAD"][4]) > 0) == (path == "gateway"), run.stdout
    assert re.search(r"^this tree - HEAD, p50 of each round: [+-]\d\.\d{3} ms \(95% interval", run.stdout, re.M)


def test_a_side_that_imported_another_tree_is_refused_and_stopped(tmp_path, fake, own_processes):
    """A tree without `broker` of its own imports the installed one: that side would measure the wrong code,
    so it is refused, and its process (with its pool) is stopped rather than left to the end of the run."""
    with pytest.raises(RuntimeError, match="imported broker from .*, not from"):
        Side("elsewhere", str(tmp_path), "shim", "count", fake.url)
