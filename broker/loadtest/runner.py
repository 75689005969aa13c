"""Running a load test: a pool (and by default the fake provider as target), then one
load point after another (a sweep over concurrencies or rates, or the probes of a
`--find-max` search, see `search.py`), every request timed in its worker. Records are
appended to `records.jsonl` as requests end, so a run killed half-way still leaves usable
results; `results.json` is written at the start and after each point.

A stalled stream is cut by the pool's watchdog at `stale_timeout` (or `first_event_timeout`
before any output) and recorded as a stall, never retried (`max_attempts = 1`): the run
always finishes, and stalls are counted rather than hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import msgspec
import psutil

from ..client.client import AsyncClient, CallLimits
from ..client.pool import Pool
from ..errors import RequestError
from ..fake_provider import FakeProviderProcess
from ..fake_provider.server import Latency
from ..protocol import TimedCall
from .cloudtarget import cloud_profile
from .machine import machine, versions
from .measure import Measurement
from .options import Options, Workload
from .schedule import Share, arrivals
from .search import conclude, loads, probe_note
from .servermetrics import ServerMetrics, point_metrics
from .summary import label, parse_slo, point_result, steady_window
from .trace import Trace
from .workload import APIS, Turn, to_http

if TYPE_CHECKING:
    from .sdkpath import SdkPath

# The placeholder key of the fake or a URL target (the OpenAI SDK needs one; "EMPTY" as vLLM's docs use),
# in a variable of our own for the workers to read, so the caller's ANTHROPIC_API_KEY and OPENAI_API_KEY stay
# as they are, and go to their own provider only.
_TARGET_KEY = "ISOPOOL_LOADTEST_KEY"
_NO_KEY = "EMPTY"
_LAG_TICK = 0.05
_BACKSTOP = 5.0  # seconds the broker's watchdog waits beyond the worker's own stall limits
WHOLE = Share()  # the whole point, sent by one generator


class Progress(Protocol):
    def note(self, text: str) -> None: ...
    def point(self, label: str, total: int | None, seconds: float | None) -> None: ...
    def record(self, record: dict[str, Any]) -> None: ...
    def sample(self, sample: dict[str, Any]) -> None: ...


class _Quiet:
    def note(self, text: str) -> None:
        pass

    def point(self, label: str, total: int | None, seconds: float | None) -> None:
        pass

    def record(self, record: dict[str, Any]) -> None:
        pass

    def sample(self, sample: dict[str, Any]) -> None:
        pass


@contextlib.contextmanager
def target_pool(
    options: Options, api: str, fake_url: str = "", run_dir: str = ""
) -> Iterator[tuple[Pool, str, FakeProviderProcess | None]]:
    """A pool whose one profile points at the target; the fake provider too when that is the target, unless
    `fake_url` says where one already runs (a `--ray` run's driver starts one for all the nodes)."""
    kind = options.cloud or APIS[api][0]
    with contextlib.ExitStack() as stack:
        profile: dict[str, Any] = {"kind": kind}
        fake = None
        if options.target == "fake":
            fake = None if fake_url else stack.enter_context(fake_provider(options))
            url = fake_url or fake.url  # type: ignore[union-attr]
            profile["base_url"] = url if kind == "anthropic" else url + "/v1"
        elif options.target.startswith("http"):
            profile["base_url"] = options.target.rstrip("/")
        if options.cloud:  # its own places (cloudtarget.py)
            profile = cloud_profile(kind, url if options.target == "fake" else "", options.target)
        if (key_env := target_key_env(options)) and kind != "bedrock":  # Bedrock signs with the AWS chain
            profile["api_key_env"] = key_env
        streams = options.worker_streams
        workers = math.ceil(options.capacity / streams)
        profile |= {"min_workers": workers, "max_workers": workers, "spare_workers": 0,
                    "concurrency": streams}  # fmt: skip
        pool = stack.enter_context(
            Pool(
                profiles={kind: profile},
                max_attempts=1,
                stale_timeout=options.stale_timeout,
                first_event_timeout=options.first_event_timeout,
                deadline=max(3600.0, options.duration * 2),
                queue_limit=1_000_000,
                run_dir=run_dir,
            )
        )
        yield pool, kind, fake


def fake_provider(options: Options, host: str = "127.0.0.1") -> FakeProviderProcess:
    """The built-in fake provider with the run's latency model and faults (not started)."""
    latency = Latency(ttft=options.fake_ttft, gap=options.fake_gap, tokens=1_000_000,  # max_tokens decides
                      knee=options.fake_load_knee, slope=options.fake_load_slope)  # fmt: skip
    return FakeProviderProcess(latency, options.fake_faults, options.seed, prefix_cache=True, host=host)


def target_key_env(options: Options) -> str | None:
    """The variable whose key the workers send: --api-key-env's if given; else a provider's key goes to its
    own provider only (None: the profile kind's ANTHROPIC_API_KEY or OPENAI_API_KEY), and the fake or a URL,
    which may be anyone's server, gets a placeholder."""
    if options.api_key_env:
        return options.api_key_env
    if options.target in ("anthropic", "openai"):
        return None
    os.environ[_TARGET_KEY] = _NO_KEY
    return _TARGET_KEY


def run(options: Options, out_dir: str, progress: Progress | None = None) -> dict[str, Any]:
    """Run every load point; write `records.jsonl` (as requests end) and `results.json` into `out_dir`."""
    progress = progress or _Quiet()
    if options.ray:
        from .distributed import run_on_ray

        return run_on_ray(options, out_dir, progress)
    server = ServerMetrics.of(options)  # None without --server-metrics; a server we did not start is checked now
    os.makedirs(out_dir, exist_ok=True)
    workload = options.workload()
    if isinstance(workload, Trace):
        progress.note(workload.describe(options.find_max.first if options.find_max else options.speedup,
                                        options.duration))  # fmt: skip
    api = workload.api
    results = results_header(options, api)
    if options.calibrate:
        results["calibration"] = calibration = calibrate(options)
        progress.note(
            f"generator ceiling on this machine: {calibration['chunks_per_s']:,.0f} chunks/s, "
            f"{calibration['requests_per_s']:,.1f} requests/s at {calibration['concurrency']} streams "
            "(against the built-in fake provider, which shares the CPU: a lower bound)"
        )
    write_json(os.path.join(out_dir, "results.json"), results)
    with open(os.path.join(out_dir, "records.jsonl"), "wb") as sink, target_pool(options, api) as (pool, profile, fake):
        results["pool"] = {"workers": pool.settings.profiles[profile].max_workers,
                           "streams_per_worker": options.worker_streams}  # fmt: skip
        if server is not None:
            progress.note(server.start(fake.url if fake else ""))
        search = options.find_max
        for number, load in enumerate(loads(options, results["points"]) if search else options.points):
            if search:  # a probe's load is known only now: recorded before it runs, for a run killed during it
                results["load_points"].append(load)
                write_json(os.path.join(out_dir, "results.json"), results)
            scraper = server.scraper() if server is not None else None
            with scraper or contextlib.nullcontext():
                point = asyncio.run(_run_point(pool, profile, workload, options, number, load, sink, progress))
            if scraper is not None:
                point["server_metrics"] = point_metrics(scraper, point["summary"]["window"])
            if options.calibrate:
                compare_with_ceiling(point, results["calibration"])
            results["points"].append(point)
            if fake is not None:  # what the target itself counted (faults it injected, answers)
                results["fake_provider"] = fake.stats()
            if search:
                results["search"] = conclude(search, parse_slo(options.slo), results["points"])
                progress.note(probe_note(search, point))
            write_json(os.path.join(out_dir, "results.json"), results)
    return results


def results_header(options: Options, api: str) -> dict[str, Any]:
    """What `results.json` says before any point has run."""
    return {
        "schema": 1,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "options": msgspec.to_builtins(options),
        "api": api,
        "machine": machine(),
        "versions": versions(),
        "load_points": options.points,
        "points": [],
    }


def calibrate(options: Options) -> dict[str, Any]:
    """The generator's own ceiling here: a few seconds at the run's highest concurrency and the
    same request shapes, against the built-in fake provider answering as fast as it can."""
    trial = msgspec.structs.replace(
        options, target="fake", concurrency=[options.capacity], rate=[], requests=0, duration=4.0, warmup=1.0,
        ramp_up=0.0, fake_ttft=0.0, fake_gap=0.0, fake_faults={}, calibrate=False, slo="", api_key_env="",
        server_metrics="", server_metrics_series="",
        trace="", speedup=1.0, find_max=None, fake_load_knee=0, fake_load_slope=0.0,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        point = run(trial, scratch)["points"][0]
    throughput = point["summary"]["throughput"]
    return {"concurrency": options.capacity, "chunks_per_s": throughput["chunks_per_s"],
            "requests_per_s": throughput["requests_per_s"], "in_flight_mean": point["generator"]["in_flight_mean"],
            "cpu_cores_mean": point["generator"]["cpu_cores_mean"]}  # fmt: skip


def compare_with_ceiling(point: dict[str, Any], calibration: dict[str, Any]) -> None:
    chunks = point["summary"]["throughput"]["chunks_per_s"]
    if calibration["chunks_per_s"] and chunks >= 0.9 * calibration["chunks_per_s"]:
        generator = point["generator"]
        ceiling = (f"it delivered {chunks:,.0f} chunks/s, at its calibrated ceiling of "
                   f"{calibration['chunks_per_s']:,.0f}")  # fmt: skip
        if generator["verdict"] == "the generator kept up":
            generator["verdict"] = "the generator was the limit: " + ceiling
        else:
            generator["verdict"] += "; " + ceiling


def write_json(path: str, data: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(data)))
    os.replace(tmp, path)


async def _run_point(
    pool: Pool, profile: str, workload: Workload, options: Options, number: int, load: dict[str, Any],
    sink: Any, progress: Progress,
) -> dict[str, Any]:  # fmt: skip
    begin_point(progress, options, load)
    run = await drive_point(pool, profile, workload, options, number, load,
                            lambda record: write_records(sink, [record], progress), progress)  # fmt: skip
    window = steady_window(run.records, options.warmup, options.duration)
    return point_result(load, run.records, run.samples, run.lags, parse_slo(options.slo), run.cpu_cores, window)


def begin_point(progress: Progress, options: Options, load: dict[str, Any]) -> None:
    progress.point(label(load), options.requests_per_point or None, options.duration or None)


def write_records(sink: Any, records: list[dict[str, Any]], progress: Progress) -> None:
    """Records to records.jsonl as they come (a killed run keeps every one that ended), and to the live view."""
    for record in records:
        sink.write(msgspec.json.encode(record) + b"\n")
        progress.record(record)
    sink.flush()


class PointRun(NamedTuple):
    """What one generator measured of a point: its records, and how it did (see `point_result`)."""

    records: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    lags: list[float]
    cpu_cores: float | None  # None: not measured (figures rebuilt from records)


async def drive_point(
    pool: Pool, profile: str, workload: Workload, options: Options, number: int, load: dict[str, Any],
    on_record: Callable[[dict[str, Any]], None], progress: Progress, share: Share = WHOLE,
) -> PointRun:  # fmt: skip
    """Send this generator's `share` of one load point through `pool` and time every request; each record
    goes to `on_record` as its request ends, its times in seconds from the share's start."""
    records: list[dict[str, Any]] = []
    total = options.requests_per_point
    live = _Live(pool.pid)
    if share.start:  # the moment every generator of the point begins
        await asyncio.sleep(max(0.0, (share.start - time.monotonic_ns()) / 1e9))
    cpu_before, started = live.cpu.seconds(), time.monotonic()
    start = share.start or time.monotonic_ns()
    budget = _Budget(share.part(total), start + int(options.duration * 1e9) if options.duration else 0, share)
    warmup_ns = int(options.warmup * 1e9)
    cap = asyncio.Semaphore(share.part(load["max_concurrency"])) if load.get("max_concurrency") else None
    # the worker cuts stalls itself; the broker's watchdog only catches a worker that hangs
    backstop = CallLimits(options.first_event_timeout + _BACKSTOP, options.stale_timeout + _BACKSTOP)
    sdk = _sdk_path(workload.api, pool.url, profile) if options.sdk else None
    async with AsyncClient(pool.url) as client:

        async def one(index: int, conversation: int, turn: int, request: Turn, scheduled: int) -> None:
            """Send one request and record it; under a cap, waiting for a slot counts against it."""
            async with cap or contextlib.nullcontext():
                call = TimedCall(to_http(workload.api, request.body), options.first_event_timeout,
                                 options.stale_timeout)  # fmt: skip
                m = Measurement(index, scheduled, time.monotonic_ns(), request.input_tokens, request.requested)
                live.in_flight += 1
                try:
                    if sdk is not None:
                        await sdk.measure(request, m)
                    else:
                        pending = await client.submit_http(profile, call, backstop)
                        async for event in pending:
                            m.tick(event.name, event.data)
                            live.chunks += 1
                        result = await pending.result()
                        m.finish(time.monotonic_ns(), result.status, result.body)
                except RequestError as exc:
                    m.fail(time.monotonic_ns(), exc)
                finally:
                    live.in_flight -= 1
            record = m.record(start, number, scheduled - start < warmup_ns, conversation, turn)
            records.append(record)
            on_record(record)

        async def converse(conversation: int, due: int) -> None:
            """A conversation's turns one after another: each is due when the one before ended."""
            for turn, request in enumerate(workload.conversation(conversation)):
                index = budget.claim()
                if index is None:
                    return
                await one(index, conversation, turn, request, due)
                due = time.monotonic_ns()

        sampler = asyncio.create_task(_sample(live, progress))
        try:
            if "concurrency" in load:
                await _closed_loop(converse, share.part(load["concurrency"]), budget, options.ramp_up, share)
            else:
                starts = -(-total // workload.turns) if total else 0
                offsets = workload.offsets(load["speedup"]) if isinstance(workload, Trace) else arrivals(
                    load["rate"], load["arrival"], options.ramp_up, options.seed)  # fmt: skip
                await _open_loop(converse, offsets, starts, budget, start, share)
        finally:
            sampler.cancel()
            if sdk is not None:
                await sdk.close()
    cores = (live.cpu.seconds() - cpu_before) / (time.monotonic() - started)
    return PointRun(records, live.samples, live.lags, cores)


def _sdk_path(api: str, pool_url: str, profile: str) -> SdkPath:
    """--sdk's path. Imported here, not at the top: the two SDKs take seconds of CPU to import, which a
    run without --sdk never needs."""
    from .sdkpath import SdkPath

    return SdkPath(api, pool_url, profile)


class _Budget:
    """Request numbers for one point (the share's), until `total` requests (0: no limit) or `ends_at` (0: none)."""

    def __init__(self, total: int, ends_at: int, share: Share) -> None:
        self.total, self.ends_at, self.issued = total, ends_at, 0
        self.numbers = share.numbers()

    def open(self) -> bool:
        return not (self.total and self.issued >= self.total) and not (
            self.ends_at and time.monotonic_ns() >= self.ends_at
        )

    def claim(self) -> int | None:
        if not self.open():
            return None
        self.issued += 1
        return next(self.numbers)


async def _closed_loop(converse: Any, concurrency: int, budget: _Budget, ramp_up: float, share: Share) -> None:
    """`concurrency` lanes, each starting its next conversation when its last one ends (that
    moment is its scheduled time); lanes start spread over `ramp_up` seconds."""
    conversations = share.numbers()

    async def lane(k: int) -> None:
        await asyncio.sleep(ramp_up * k / concurrency)
        while budget.open():
            await converse(next(conversations), time.monotonic_ns())

    await asyncio.gather(*(lane(k) for k in range(concurrency)))


async def _open_loop(converse: Any, offsets: Iterator[float], starts: int, budget: _Budget, start: int,
                     share: Share) -> None:  # fmt: skip
    """Conversations (single requests, unless --turns) start at their scheduled times (`offsets` seconds
    from `start`: a rate's arrivals, or a trace's), the share's of them."""
    tasks: set[asyncio.Task] = set()
    for conversation, offset in share.mine(enumerate(offsets)):
        due = start + int(offset * 1e9)
        if (starts and conversation >= starts) or (budget.ends_at and due >= budget.ends_at):
            break
        delay = (due - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(converse(conversation, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))


class _Live:
    """Counters the sampler reads each second."""

    def __init__(self, broker_pid: int) -> None:
        self.cpu = _GeneratorCpu(broker_pid)
        self.in_flight = 0
        self.chunks = 0
        self.lags: list[float] = []
        self.samples: list[dict[str, Any]] = []


class _GeneratorCpu:
    """CPU seconds the generator has used: this process, the broker, its zygote and workers (not
    the target). A process that has ended keeps the time last read for it."""

    def __init__(self, broker_pid: int) -> None:
        self.me, self.broker_pid = psutil.Process(), broker_pid
        self.procs: dict[int, psutil.Process] = {}
        self.used: dict[int, float] = {}

    def seconds(self) -> float:
        try:
            broker = psutil.Process(self.broker_pid)
            family = [self.me, broker, *broker.children(recursive=True)]
        except psutil.Error:
            family = [self.me]
        for proc in family:
            proc = self.procs.setdefault(proc.pid, proc)
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                self.used[proc.pid] = times.user + times.system
        return sum(self.used.values())


async def _sample(live: _Live, progress: Progress) -> None:
    """Once a second: the generator's CPU, its event loop's lag, ticks received and requests in flight."""
    cores = os.cpu_count() or 1
    cpu = live.cpu.seconds
    last_cpu, last_t, last_chunks = cpu(), time.monotonic(), 0
    while True:
        lag = 0.0
        for _ in range(int(1 / _LAG_TICK)):
            before = time.monotonic()
            await asyncio.sleep(_LAG_TICK)
            late = time.monotonic() - before - _LAG_TICK
            live.lags.append(late)
            lag = max(lag, late)
        now, used = time.monotonic(), cpu()
        sample = {
            "cpu_cores": round((used - last_cpu) / (now - last_t), 3),
            "cpu_share": round((used - last_cpu) / (now - last_t) / cores, 3),
            "loop_lag_max": round(lag, 6),
            "ticks_per_s": round((live.chunks - last_chunks) / (now - last_t), 1),
            "in_flight": live.in_flight,
        }
        live.samples.append(sample)
        progress.sample(sample)
        last_cpu, last_t, last_chunks = used, now, live.chunks
