"""faults: 1,000 chat requests at concurrency 64 while 5% of streams stall (the server keeps
sending `: ping` every second) and 2% are reset; isopool against the ways people guard calls
today, each stopped at the same wall-time cap.

Contenders: (a) isopool (`stale_timeout` 1 s); (b) plain SDK clients with default timeouts;
(c) an in-process watchdog thread that closes a stalled stream and rebuilds its client after
the same 1 s; (d) pebble's `ProcessPool.schedule(timeout=10)`, a total per-task timeout.
The threads and tasks of (b)-(d) retry a failed request up to three times, as an
application would. A request counts as correct when its text equals the unfaulted answer.

Target: isopool's makespan within 1.2x of the same run with no faults injected."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import openai
import psutil

from broker import Pool, RequestError
from broker.fake_provider import FakeProviderProcess
from broker.fake_provider.server import Latency

from .common import pick, pool_pids, result, target

LATENCY = Latency(ttft=0.05, gap=0.01, tokens=24)
FAULTS = {"stall-ping:after=3,interval=1,hold=3600": 0.05, "reset:after=3": 0.02}
STALE = 1.0  # isopool's stale_timeout and the in-process watchdog's limit
TASK_TIMEOUT = 10.0  # pebble's per-task timeout: ~30x a normal request here
ATTEMPTS = 3


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i}"}]


def _stream_text(client: openai.OpenAI, i: int, on_chunk: Any = None) -> str:
    stream = client.chat.completions.create(model="gpt-bench", messages=_messages(i), stream=True)
    if on_chunk is not None:
        on_chunk(stream)
    parts = []
    for chunk in stream:
        if on_chunk is not None:
            on_chunk(stream)
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


class Tally:
    """Answers by request index, what is in flight, and when the last answer came."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()
        self.next = 0
        self.in_flight = 0
        self.answers: dict[int, str | None] = {}  # None: failed after every attempt
        self.finished_at: float | None = None

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.n:
                return None
            self.next += 1
            self.in_flight += 1
            return self.next - 1

    def take_all(self) -> range:
        """Every request at once (for a pool that queues them itself)."""
        with self.lock:
            self.next = self.in_flight = self.n
        return range(self.n)

    def answer(self, i: int, text: str | None) -> None:
        with self.lock:
            self.answers[i] = text
            self.in_flight -= 1
            if len(self.answers) == self.n:
                self.finished_at = time.monotonic()

    def outcome(self, start: float, cap: float, expected: dict[int, str]) -> dict[str, Any]:
        with self.lock:
            answers, in_flight, started = dict(self.answers), self.in_flight, self.next
            finished = self.finished_at
        correct = sum(1 for i, text in answers.items() if text is not None and text == expected.get(i))
        return {
            "makespan_s": round(finished - start, 2) if finished else None,
            "capped_at_s": None if finished else cap,
            "correct": correct,
            "wrong": sum(1 for i, text in answers.items() if text is not None and text != expected.get(i)),
            "failed": sum(1 for text in answers.values() if text is None),
            "hanging_at_cap": in_flight if not finished else 0,
            "never_started": self.n - started,
        }


def _wait(tally: Tally, start: float, cap: float) -> None:
    while tally.finished_at is None and time.monotonic() - start < cap:
        time.sleep(0.05)


def isopool(n: int, concurrency: int, faults: dict[str, float], cap: float) -> tuple[dict[str, Any], dict[int, str]]:
    """(a): non-streaming requests through the pool, whose workers stream and assemble them."""
    with FakeProviderProcess(LATENCY, faults, seed=1) as fake:
        profile = {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": concurrency,
                   "max_workers": concurrency + 8, "spare_workers": 4}  # fmt: skip
        with Pool(profiles={"openai": profile}, stale_timeout=STALE, first_event_timeout=STALE,
                  max_attempts=5) as pool:  # fmt: skip
            tally = Tally(n)
            spans: list[tuple[float, float, int]] = []  # each request's (start, end, attempts)

            async def lane(client: Any) -> None:
                while (i := tally.take()) is not None:
                    began, served = time.monotonic(), None
                    try:
                        call = await client.submit("openai", "chat.completions.create", model="gpt-bench",
                                                   messages=_messages(i))  # fmt: skip
                        res = await call.result()
                        served = call.served
                        tally.answer(i, res.json()["choices"][0]["message"]["content"])
                    except RequestError:
                        tally.answer(i, None)
                    spans.append((began - start, time.monotonic() - start, served.attempts if served else 0))

            async def drive() -> None:
                async with pool.async_client() as client:
                    lanes = [asyncio.ensure_future(lane(client)) for _ in range(concurrency)]
                    done, pending = await asyncio.wait(lanes, timeout=cap)
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)

            with pool.client() as client:
                cpu = _cpu_seconds(client.stats(), pool.pid, fake.pid)
            start = time.monotonic()
            asyncio.run(drive())
            with pool.client() as client:
                stats = client.stats()
                cpu = _cpu_seconds(stats, pool.pid, fake.pid) - cpu
        injected = fake.stats()["faults"]
    texts = {i: t for i, t in tally.answers.items() if t is not None}
    out = tally.outcome(start, cap, texts) | {"faults_injected": injected,
                                              "stalls_recovered": sum(stats["stalls"].values()),
                                              "cpu_s": round(cpu, 2), "stall_floor_s": _stall_floor(spans)}  # fmt: skip
    return out, texts


def _stall_floor(spans: list[tuple[float, float, int]]) -> float | None:
    """The soonest the run could have ended given where its stalls fell: a stalled request is retried only
    once silent for the stale_timeout, and its retry takes at least as long as the quickest request did.
    The latest such bound over the requests retried after a wait that long (None without any)."""
    quickest = min((end - began for began, end, attempts in spans if attempts == 1), default=0.0)
    stalled = [began + STALE + quickest for began, end, attempts in spans if attempts > 1 and end - began >= STALE]
    return round(max(stalled), 2) if stalled else None


def _cpu_seconds(stats: dict[str, Any], broker: int, fake: int) -> float:
    """CPU seconds this process, the pool (broker, zygote, its live workers and, through the zygote, those
    it has reaped) and the fake provider have spent so far: the whole run's work on this machine's cores."""
    total = sum(os.times()[:2])
    for pid in (fake, *pool_pids(stats, broker)):
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:  # a worker killed meanwhile: the zygote's children count it once reaped
            continue
        total += t.user + t.system + (t.children_user + t.children_system if pid == stats["zygote_pid"] else 0)
    return total


def _threads(n: int, concurrency: int, faults: dict[str, float], cap: float, expected: dict[int, str],
             watchdog: bool) -> dict[str, Any]:  # fmt: skip
    """(b) plain SDK clients on threads; with `watchdog`, (c): a thread closes stalled streams."""
    tally = Tally(n)
    with FakeProviderProcess(LATENCY, faults, seed=1) as fake:
        url = fake.url + "/v1"
        lanes: list[dict[str, Any]] = []
        stop = threading.Event()

        def run_lane(state: dict[str, Any]) -> None:
            def seen(stream: Any) -> None:
                state["stream"], state["last"] = stream, time.monotonic()

            while (i := tally.take()) is not None and not stop.is_set():
                text = None
                for _ in range(ATTEMPTS):
                    try:
                        text = _stream_text(state["client"], i, seen if watchdog else None)
                        break
                    except Exception:  # a reset, or the watchdog closing the stream
                        continue
                    finally:
                        state["stream"] = None
                tally.answer(i, text)

        def guard() -> None:
            """What agents do today: close a stream silent for STALE seconds, rebuild its client."""
            while not stop.wait(0.05):
                now = time.monotonic()
                for state in lanes:
                    stream = state["stream"]
                    if stream is not None and now - state["last"] > STALE:
                        state["stream"] = None
                        old, state["client"] = state["client"], openai.OpenAI(base_url=url)
                        stream.close()
                        old.close()

        for _ in range(concurrency):
            lanes.append({"client": openai.OpenAI(base_url=url), "stream": None, "last": 0.0})
        start = time.monotonic()
        threads = [threading.Thread(target=run_lane, args=(s,), daemon=True) for s in lanes]
        if watchdog:
            threads.append(threading.Thread(target=guard, daemon=True))
        for t in threads:
            t.start()
        _wait(tally, start, cap)
        out = tally.outcome(start, cap, expected)
        stop.set()
        injected = fake.stats()["faults"]
    # leaving the block stopped the fake provider, which ends the streams still hanging
    return out | {"faults_injected": injected}


_task_client: openai.OpenAI | None = None


def _pebble_task(url: str, i: int) -> str:
    global _task_client
    if _task_client is None:
        _task_client = openai.OpenAI(base_url=url)
    try:
        return _stream_text(_task_client, i)
    except Exception as exc:  # the SDK's exceptions do not pickle, and one that does not breaks the pool
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None


def pebble_pool(n: int, concurrency: int, faults: dict[str, float], cap: float,
                expected: dict[int, str]) -> dict[str, Any]:  # fmt: skip
    """(d): a process pool killing a task at a total per-task timeout; retried up to ATTEMPTS times."""
    from pebble import ProcessPool

    tally = Tally(n)
    with FakeProviderProcess(LATENCY, faults, seed=1) as fake, ProcessPool(max_workers=concurrency) as pool:
        url = fake.url + "/v1"
        running: dict[int, Any] = {}
        stopping = threading.Event()

        def schedule(i: int, attempt: int) -> None:
            if stopping.is_set():  # at the cap: what is left stays unanswered
                return
            future = pool.schedule(_pebble_task, args=(url, i), timeout=TASK_TIMEOUT)
            running[i] = future
            future.add_done_callback(lambda f: done(i, attempt, f))

        def done(i: int, attempt: int, future: Any) -> None:
            try:
                tally.answer(i, future.result())
            except (FutureTimeout, Exception):
                if attempt < ATTEMPTS:
                    schedule(i, attempt + 1)
                else:
                    tally.answer(i, None)

        start = time.monotonic()
        for i in tally.take_all():
            schedule(i, 1)
        _wait(tally, start, cap)
        out = tally.outcome(start, cap, expected)
        if out["makespan_s"] is None:
            active = [f for f in running.values() if not f.done()]
            out["hanging_at_cap"] = sum(1 for f in active if f.running())
            out["never_started"] = len(active) - out["hanging_at_cap"]
        injected = fake.stats()["faults"]
        stopping.set()
        pool.stop()
    return out | {"faults_injected": injected, "task_timeout_s": TASK_TIMEOUT}


def _lost_per_stall(run: dict[str, Any], clean: float, concurrency: int, cap: float) -> float | None:
    """Lane-seconds lost per injected stall (a lower bound for a run stopped at the cap)."""
    stalls = run["faults_injected"].get("stall-ping", 0)
    makespan = run["makespan_s"] or cap
    return round((makespan - clean) * concurrency / stalls, 2) if stalls else None


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    n, concurrency, cap = pick(size, (1000, 64, 60.0), (300, 32, 12.0), (16, 4, 4.0))
    clean, expected = isopool(n, concurrency, {}, cap)
    runs = {"isopool": isopool(n, concurrency, FAULTS, cap)[0]}
    runs["plain SDK"] = _threads(n, concurrency, FAULTS, cap, expected, watchdog=False)
    runs["in-process watchdog"] = _threads(n, concurrency, FAULTS, cap, expected, watchdog=True)
    runs["pebble ProcessPool"] = pebble_pool(n, concurrency, FAULTS, cap, expected)
    clean_makespan = clean["makespan_s"] or cap
    for r in runs.values():
        r["seconds_lost_per_stall"] = _lost_per_stall(r, clean_makespan, concurrency, cap)
    ratio = round(runs["isopool"]["makespan_s"] / clean_makespan, 3) if runs["isopool"]["makespan_s"] else None
    cores = psutil.cpu_count() or 1
    work = f"this run: CPU {clean['cpu_s']:g} s clean, {runs['isopool']['cpu_s']:g} s with faults, on {cores} cores"
    if (floor := runs["isopool"]["stall_floor_s"]) is not None:
        work += f"; its latest stall let it end no sooner than {floor:g} s = {floor / clean_makespan:.2f}x"
    figures = {"clean_isopool": clean, "contenders": runs, "isopool_makespan_vs_clean": ratio}
    inputs = {"requests": n, "concurrency": concurrency, "cap_s": cap, "fault_rates": FAULTS,
              "stale_timeout_s": STALE, "pebble_task_timeout_s": TASK_TIMEOUT, "attempts": ATTEMPTS,
              "latency": {"ttft_s": LATENCY.ttft, "gap_s": LATENCY.gap, "tokens": LATENCY.tokens}}  # fmt: skip
    targets = [
        target("isopool makespan vs no faults", ratio, f"<= 1.2x ({work})", lambda v: v <= 1.2),
        target("isopool requests correct", runs["isopool"]["correct"], f"= {n}", lambda v: v == n),
    ]
    return result(inputs, figures, targets, started)


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["contender", "makespan s", "correct", "wrong", "failed", "hanging at cap", "never started",
            "s lost per stall"]  # fmt: skip
    f = data["figures"]
    rows = [["isopool, no faults", f["clean_isopool"]["makespan_s"], f["clean_isopool"]["correct"], 0, 0, 0, 0, None]]
    for name, r in f["contenders"].items():
        makespan = r["makespan_s"] if r["makespan_s"] is not None else f"> {r['capped_at_s']:g} (cap)"
        rows.append([name, makespan, r["correct"], r["wrong"], r["failed"], r["hanging_at_cap"], r["never_started"],
                     r["seconds_lost_per_stall"]])  # fmt: skip
    return head, rows
