"""Chaos soak: steady mixed load from several client processes while workers are SIGKILLed
and SIGSTOPped, the zygote is killed, client processes vanish mid-stream, and the fake
provider injects every fault it knows on 20% of attempts.

    python -m tests.soak --minutes 10 [--clients 3] [--json FILE]

Invariants, reported at the end (exit 1 if any is violated): every request a client sent
ended in exactly one answer, a result or a typed error, within its deadline; every
succeeded answer equals what the provider says without faults; the broker's accounting
(accepted = ok + errors + cancelled) holds and its queues and slots are empty once load
stops; no process outlives the run; the broker's file descriptors and memory stay flat
after warm-up (slopes reported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import psutil

os.environ.setdefault("ANTHROPIC_API_KEY", "soak-key")  # the fake provider takes any key
os.environ.setdefault("OPENAI_API_KEY", "soak-key")

from broker import AsyncClient, Pool, RequestError
from broker.cli.demo import answer_text, request_shape
from broker.fake_provider import FakeProviderProcess
from broker.fake_provider.content import Reply
from broker.fake_provider.faults import KINDS
from broker.processes import running

# Every fault of the fake provider, 20% of attempts in all.
FAULT_SPECS = {
    "stall-first": "stall-first:interval=0.2",
    "stall-ping": "stall-ping:after=3,interval=0.2",
    "stall-comment": "stall-comment:after=3,interval=0.2",
    "silent": "silent:after=3",
    "drip": "drip:gap=0.05",
    "slow-first": "slow-first:delay=0.3",
    "reset": "reset:after=3",
    "close": "close:after=3",
    "http-429": "http-429:retry_after=0",
    "http-500": "http-500",
    "http-529": "http-529",
    "http-408": "http-408",
    "http-409": "http-409",
    "http-400": "http-400",
    "error-event": "error-event:after=3",
    "unavailable": "unavailable:for=2",
    "no-headers": "no-headers",
    "cut": "cut",
    "no-done": "no-done",
    "malformed": "malformed",
    "context-length": "context-length",
    "content-filter": "content-filter",
}
assert set(FAULT_SPECS) == set(KINDS), "a fault kind of the fake provider is missing from the soak"
RATES = {spec: 0.2 / len(FAULT_SPECS) for spec in FAULT_SPECS.values()}
TOKENS = 16
DEADLINE = 30.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----- a client process ------------------------------------------------------------


async def client_main(url: str, seed: int, seconds: float, concurrency: int) -> None:
    """Send mixed requests for `seconds`; each ends as ok, wrong, abandoned or a typed error, written as a JSON
    line as it ends (a client the soak SIGKILLs has told what it saw), then `null` once all have ended."""
    rng = random.Random(seed)
    stop = time.monotonic() + seconds

    async def one(client: AsyncClient, i: int) -> str:
        profile, method, kwargs, stream = request_shape(i)
        call = await client.submit(profile, method, stream=stream, **kwargs)
        if stream and rng.random() < 0.05:  # the caller walks away mid-stream
            async for _ in call:
                break
            return "abandoned"
        events = [e.json() async for e in call] if stream else []
        result = await call.result()
        text = answer_text(method, stream, events, None if stream else result.json())
        return "ok" if text == Reply(kwargs, TOKENS).text else "wrong"

    async def lane(client: AsyncClient, k: int) -> None:
        n = 0
        while time.monotonic() < stop:
            i = seed * 1_000_000 + k * 10_000 + n
            n += 1
            started = time.monotonic()
            try:
                outcome = await asyncio.wait_for(one(client, i), DEADLINE + 10)
            except RequestError as exc:
                outcome = f"error:{exc.code}"
            except TimeoutError:
                outcome = "VIOLATION: no answer within the deadline"
            except Exception as exc:  # noqa: BLE001 - an untyped error is a finding
                outcome = f"VIOLATION: untyped {type(exc).__name__}: {exc}"
            if time.monotonic() - started > DEADLINE + 5:
                outcome = "VIOLATION: answered after the deadline"
            print(json.dumps(outcome), flush=True)

    async with AsyncClient(url) as client:
        await asyncio.gather(*(lane(client, k) for k in range(concurrency)))
    print(json.dumps(None), flush=True)


# ----- the soak ---------------------------------------------------------------------


def _slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope per minute of (seconds, value) samples."""
    if len(samples) < 3:
        return 0.0
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    return 60 * sum((t - mx) * (v - my) for t, v in samples) / var if var else 0.0


class Soak:
    def __init__(self, minutes: float, clients: int, seed: int = 1) -> None:
        self.seconds = minutes * 60
        self.clients = clients
        self.rng = random.Random(seed)
        self.chaos: Counter[str] = Counter()
        self.violations: list[str] = []
        self.tallies: Counter[str] = Counter()
        self.samples: list[tuple[float, float, float]] = []  # (t, fds, rss MB) of the broker
        self.procs: dict[int, subprocess.Popen] = {}
        self.owned: set[int] = set()  # every process the soak started or saw its pool start
        self.next_seed = 1

    def _start_client(self, url: str, seconds: float) -> None:
        seed = self.next_seed
        self.next_seed += 1
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.soak", "--client", url, "--seed", str(seed), "--seconds", f"{seconds:.1f}"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        self.procs[seed] = proc
        self.owned.add(proc.pid)

    def _chaos(self, stats: dict[str, Any], url: str, remaining: float) -> None:
        """One act of chaos, chosen at random (first the act, then whether it applies now: a
        zygote kill must not become likelier while no worker is up)."""
        self.owned.update(w["pid"] for w in stats["workers"] if w["pid"])
        self.owned.add(stats["zygote_pid"])
        workers = [w for w in stats["workers"] if w["pid"] and w["state"] in ("ready", "busy")]
        act = self.rng.choices(["worker SIGKILL", "worker SIGSTOP", "zygote SIGKILL", "client process SIGKILL", "none"],
                               weights=[45, 20, 5, 10, 20])[0]  # fmt: skip
        try:
            if act == "worker SIGKILL" and workers:
                os.kill(self.rng.choice(workers)["pid"], signal.SIGKILL)
            elif act == "worker SIGSTOP" and workers:
                os.kill(self.rng.choice(workers)["pid"], signal.SIGSTOP)  # a hung interpreter
            elif act == "zygote SIGKILL" and stats["zygote_pid"]:
                os.kill(stats["zygote_pid"], signal.SIGKILL)
            elif act == "client process SIGKILL" and remaining > 3:
                running = [s for s, p in self.procs.items() if p.poll() is None]
                if not running:
                    return
                victim = self.procs.pop(self.rng.choice(running))
                victim.kill()
                out, _ = victim.communicate()
                self._tally(out, finished=False)
                self._start_client(url, remaining)
            else:
                return
            self.chaos[act] += 1
        except ProcessLookupError:
            pass

    def run(self) -> dict[str, Any]:
        with FakeProviderProcess(rates=RATES, seed=7) as fake:
            self.owned.add(fake.pid)
            profiles = {
                "anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 3, "max_workers": 8},
                "openai": {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 3, "max_workers": 8},
            }
            settings = dict(stale_timeout=0.5, first_event_timeout=1.0, deadline=DEADLINE, max_attempts=6,
                            heartbeat_interval=0.1, heartbeat_misses=5, log_level="ERROR")  # fmt: skip
            with Pool(profiles=profiles, **settings) as pool, pool.client() as watcher:
                broker = psutil.Process(pool.pid)
                self.owned.add(pool.pid)
                start = time.monotonic()
                for _ in range(self.clients):
                    self._start_client(pool.url, self.seconds)
                while (elapsed := time.monotonic() - start) < self.seconds:
                    self._chaos(watcher.stats(), pool.url, self.seconds - elapsed)
                    self.samples.append((elapsed, broker.num_fds(), broker.memory_info().rss / 2**20))
                    time.sleep(self.rng.uniform(0.2, 0.6))
                for seed, proc in self.procs.items():
                    try:
                        out, _ = proc.communicate(timeout=DEADLINE + 30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        out, _ = proc.communicate()
                    if not self._tally(out, finished=True):
                        self.violations.append(f"client {seed} did not finish (hung or crashed)")
                self._check_broker(watcher)
                stats = watcher.stats()
            fake_stats = fake.stats()
        left = self._alive(deadline=time.monotonic() + 5)
        if left:
            self.violations.append(f"processes outlived the soak: {sorted(left)}")
        self.violations += [f"{n} x {k}" for k, n in self.tallies.items() if k.startswith("VIOLATION") or k == "wrong"]
        warm = [s for s in self.samples if s[0] >= self.seconds / 3]
        return {
            "minutes": self.seconds / 60,
            "client_outcomes": dict(self.tallies),
            "requests_answered": sum(self.tallies.values()),
            "broker_requests": dict(stats["requests"]),
            "faults_injected": fake_stats["faults"],
            "chaos": dict(self.chaos),
            "kills_by_reason": dict(stats["kills"]),
            "stalls_recovered": dict(stats["stalls"]),
            "retries": stats["retries"],
            "zygote_restarts": stats["zygote_restarts"],
            "broker_fd_slope_per_min": round(_slope([(t, f) for t, f, _ in warm]), 2),
            "broker_rss_slope_mb_per_min": round(_slope([(t, r) for t, _, r in warm]), 2),
            "broker_fds_first_last": [self.samples[0][1], self.samples[-1][1]] if self.samples else [],
            "violations": self.violations,
        }

    def _tally(self, out: str, finished: bool) -> bool:
        """Count a client's outcomes, one JSON line each (a killed client's last line may be cut off); whether
        it wrote its closing `null`."""
        lines = out.splitlines()
        if not finished and lines and not out.endswith("\n"):
            lines.pop()
        outcomes = [json.loads(line) for line in lines]
        self.tallies.update(o for o in outcomes if o is not None)
        return bool(outcomes) and outcomes[-1] is None

    def _alive(self, deadline: float) -> set[int]:
        """The soak's processes still running (waiting until `deadline` for them to go)."""
        while True:
            alive = running(self.owned)
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def _check_broker(self, watcher: Any) -> None:
        """Once load stops: nothing in flight or queued, every slot free, every request accounted."""
        deadline = time.monotonic() + DEADLINE
        while True:
            stats = watcher.stats()
            busy = [w["ident"] for w in stats["workers"] if w["requests"]]
            if not stats["in_flight"] and not any(stats["queued"].values()) and not busy:
                break
            if time.monotonic() > deadline:
                self.violations.append(f"not idle after the load: in flight {stats['in_flight']}, busy {busy}")
                return
            time.sleep(0.2)
        counts = stats["requests"]
        ended = counts.get("ok", 0) + counts.get("cancelled", 0)
        ended += sum(n for k, n in counts.items() if k.startswith("error:"))
        if ended != counts.get("accepted", 0):
            self.violations.append(f"broker accounting: {counts.get('accepted', 0)} accepted, {ended} ended")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=3, help="client processes")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as one client process
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(client_main(args.client, args.seed, args.seconds, concurrency=8))
        return 0
    report = Soak(args.minutes, args.clients).run()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
