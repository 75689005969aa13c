"""This tree's pool against another commit's, in one run: the same call made through each, in blocks taken
in turn from two caller processes (and by the direct SDK from this one), so that a change is read against
the machine's drift within minutes, not across runs (issue 21: between two `python -m bench shim` runs
minutes apart the bare hop alone moved from +0.26 to +0.60 ms).

    python -m bench.ab REV [--path shim|gateway] [--call count|tiny|chat] [--calls 3000] [--block 50]

REV is any commit (`HEAD`, `main~3`, a hash); its tree is taken with `git archive` into a scratch directory,
and this tree is the working tree, uncommitted changes included. Each side is a process of its own
(bench/ab_side.py, run with that tree first on PYTHONPATH) holding a pool of that tree and the official
SDKs calling through it; both call the same upstream (`--upstream`: the fake provider, or the plain aiohttp
server). Printed: per side p50 / p99 / mean ms and CPU µs per call of the caller, the gateway, the broker and
the worker; then this tree minus REV: the median of the blocks' p50 differences, with a 95% interval (bootstrap over
the blocks). An interval that holds 0 says the two cannot be told apart in this run."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from .common import in_blocks, latency, percentile, timed
from .sidebyside import latency_calls
from .upstreams import direct, upstreams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ab_side.py")
CALLS = {"count": "anthropic count_tokens", "tiny": "anthropic stream, 8 tokens", "chat": "openai chat stream, 1 token"}
ROLES = ("caller", "gateway", "broker", "worker")


class Side:
    """A caller process with a pool of the tree at `tree`, making `call` on `path` when told."""

    def __init__(self, name: str, tree: str, path: str, call: str, url: str) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": tree}
        with open(SIDE) as f:
            source = f.read()
        # its own session: a Ctrl-C reaches only this process, which ends both sides in order (closing
        # their stdin); if this process dies instead, a side reads the end of its stdin and closes its pool
        self.proc = subprocess.Popen([sys.executable, "-c", source, path, call, url], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)  # fmt: skip
        try:
            ready = self._answer()
            if not str(ready.get("ready", "")).startswith(tree):
                raise RuntimeError(f"{name}: the side imported broker from {ready.get('ready')}, not from {tree}")
        except BaseException:  # no caller will close it: it has not been handed out
            self.close()
            raise

    def _answer(self) -> Any:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"{self.name}: the side process ended (exit {self.proc.wait()}); its stderr says why")
        return json.loads(line)

    def ask(self, line: str) -> Any:
        self.proc.stdin.write(line + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._answer()

    def run(self, n: int) -> list[float]:
        return self.ask(f"run {n}")

    def cpu(self) -> dict[str, float]:
        return self.ask("cpu")

    def close(self) -> None:
        """End of stdin: the side closes its pool and exits; killed if it has not within 30 s."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def tree_of(rev: str) -> Iterator[str]:
    """A scratch directory holding the tree of commit `rev` of this repository."""
    if rev.startswith("-"):  # git would read it as an option (`--output=...`)
        raise SystemExit(f"git archive {rev}: not a commit")
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev], capture_output=True)
        if archive.returncode:
            raise SystemExit(f"git archive {rev}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield tmp


def difference(ours: list[list[float]], theirs: list[list[float]], draws: int = 2000) -> tuple[float, float, float]:
    """Median of the per-round p50 differences (ms), and a 95% bootstrap interval of that median."""
    diffs = [(statistics.median(a) - statistics.median(b)) * 1e3 for a, b in zip(ours, theirs, strict=True)]
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(draws))
    return statistics.median(diffs), percentile(medians, 0.025), percentile(medians, 0.975)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("rev", help="the commit to compare this working tree with")
    parser.add_argument("--path", choices=("shim", "gateway"), default="shim")
    parser.add_argument("--call", choices=tuple(CALLS), default="count")
    parser.add_argument("--upstream", choices=("fake", "plain"), default="fake")
    parser.add_argument("--calls", type=int, default=3000, help="per side (default 3000)")
    parser.add_argument("--block", type=int, default=50, help="calls per side per round (default 50)")
    args = parser.parse_args(argv)
    rounds = max(2, args.calls // args.block)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        theirs = stack.enter_context(tree_of(args.rev))
        servers = stack.enter_context(upstreams())
        url = servers[args.upstream].url
        sides = {}
        for name, tree in (("this tree", ROOT), (args.rev, theirs)):
            sides[name] = Side(name, tree, args.path, args.call, url)
            stack.callback(sides[name].close)
        baseline = direct(servers).upstreams[args.upstream]
        one = latency_calls(baseline)[CALLS[args.call]]
        runners: dict[str, Callable[[int], list[float]]] = {"direct SDK": lambda n: timed(one, n)}
        runners |= {name: side.run for name, side in sides.items()}
        in_blocks(runners, 2, args.block)  # warm-up: connections, the SDKs' first-call costs
        before = {name: side.cpu() for name, side in sides.items()}
        times = in_blocks(runners, rounds, args.block)
        after = {name: side.cpu() for name, side in sides.items()}
        baseline.anthropic.close()
        baseline.openai.close()
    calls = rounds * args.block
    print(f"{args.path} {CALLS[args.call]} on the {args.upstream} upstream: {calls} calls a side in {rounds} rounds "
          f"of {args.block}, {time.monotonic() - started:.0f} s")  # fmt: skip
    print(f"{'':12} {'p50':>7} {'p99':>7} {'mean':>7}   CPU µs per call: " + "  ".join(f"{r:>7}" for r in ROLES))
    for name, rounds_ in times.items():
        lat = latency([t for block in rounds_ for t in block])
        cpu = ""
        if name in sides:
            cpu = "  ".join(f"{(after[name][r] - before[name][r]) * 1e6 / calls:7.0f}" for r in ROLES)
        print(f"{name:12} {lat['median_ms']:7.3f} {lat['p99_ms']:7.3f} {lat['mean_ms']:7.3f}   {'':16}{cpu}")
    mid, low, high = difference(times["this tree"], times[args.rev])
    print(f"this tree - {args.rev}, p50 of each round: {mid:+.3f} ms (95% interval {low:+.3f} .. {high:+.3f})")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: both sides' pools were closed")
