"""`isopool loadtest --server-metrics` and `isopool loadtest compare`: the server's own Prometheus
series land next to the generator's and agree with what it did; a Prometheus endpoint we did not
write is read as the standard says; a dying endpoint costs the run nothing but counted failures;
runs are compared point by point with the right signs, finished or killed, and mismatched ones
are refused."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import socket
import struct
import threading
import time

import pytest
from aiohttp import web
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

from broker.loadtest import Options, rebuild, run
from broker.loadtest.cli import loadtest
from broker.loadtest.compare import compare
from broker.loadtest.promtext import Selection, quantile
from broker.loadtest.report import save_outputs
from broker.loadtest.scrape import EndpointError, check
from broker.loadtest.servermetrics import describe

from .test_loadtest import kill_a_run

FAKE_SERIES = "fake:num_requests_*,fake:generation_tokens*,fake:time_to_first_token_seconds"


class ThirdParty:
    """A Prometheus endpoint we did not write: a plain aiohttp server rendering prometheus_client's own
    registry with generate_latest. A counter grows by 100 a second, a gauge reads 42, a histogram sees
    0.03 s each tick. `mode`: ok, hang (never answers), html (answers with a web page)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("jobs_processed", "Jobs done.", ["queue"], registry=self.registry)
        Gauge("queue_depth", "Jobs waiting.", registry=self.registry).set(42)
        self.latency = Histogram("job_seconds", "Job time.", buckets=(0.01, 0.05, 0.1, 1.0), registry=self.registry)
        Summary("poll_seconds", "Poll time.", registry=self.registry).observe(0.5)
        self.mode, self.url = "ok", ""
        self.loop = asyncio.new_event_loop()
        self.released = asyncio.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _page(self, request: web.Request) -> web.Response:
        if self.mode == "hang":
            await self.released.wait()
        if self.mode == "html":
            return web.Response(text="<html><body>a dashboard</body></html>", content_type="text/html")
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.jobs.labels("a").inc(10)
            self.latency.observe(0.03)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._page)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.ticker = asyncio.create_task(self._tick())
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/metrics"

    async def _stop(self) -> None:
        self.released.set()
        self.ticker.cancel()
        await self.runner.cleanup()

    def call(self, coro) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def die(self) -> None:
        """Stop serving: from now on, connections are refused."""
        self.call(self._stop())

    def __enter__(self) -> ThirdParty:
        self.thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.released.is_set():
            self.die()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _png_height(path) -> int:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", head[20:24])[0]


def test_the_fakes_own_metrics_agree_with_what_the_generator_did(tmp_path, own_processes):
    options = Options(calibrate=False, concurrency=[8], duration=3.0, warmup=0.5, output_tokens="40", fake_ttft=0.05,
                      fake_gap=0.005, server_metrics="target", server_metrics_interval=0.25,
                      server_metrics_series=FAKE_SERIES)  # fmt: skip
    results = run(options, str(tmp_path))
    point = results["points"][0]
    metrics, summary = point["server_metrics"], point["summary"]
    assert metrics["failed"] == 0 and metrics["scrapes"] >= 10 and not metrics["unmatched"], describe(metrics)
    assert set(metrics["kinds"]) == {
        "fake:num_requests_running", "fake:num_requests_waiting", "fake:generation_tokens_total",
        "fake:time_to_first_token_seconds_sum", "fake:time_to_first_token_seconds_count",
    }  # fmt: skip
    # aligned with the generator's seconds: from the point's start, one value per scrape and series
    assert metrics["t"][0] < 0.3 and options.duration - 0.5 <= metrics["t"][-1] <= len(point["series"])
    assert all(len(values) == len(metrics["t"]) for values in metrics["series"].values())
    window = metrics["window"]
    running, waiting = window["fake:num_requests_running"]["mean"], window["fake:num_requests_waiting"]["mean"]
    assert 6.5 <= running + waiting <= 8.0 and running > 2 * waiting, window  # 8 streams: 50 ms of 250 waiting
    tokens = window["fake:generation_tokens_total"]["rate"]
    assert tokens == pytest.approx(summary["throughput"]["output_tokens_per_s"], rel=0.3), (tokens, summary)
    ttft = metrics["histograms"]["fake:time_to_first_token_seconds"]
    assert 0.04 <= ttft["p50"] <= 0.06 and 0.045 <= ttft["mean"] <= 0.07 and ttft["count"] > 20, ttft
    save_outputs(results, str(tmp_path))
    with open(tmp_path / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["server:fake:num_requests_running:mean"]) == running
    assert float(row["server:fake:generation_tokens_total:rate"]) == tokens
    assert float(row["server:fake:time_to_first_token_seconds:p50"]) == ttft["p50"]
    assert row["server:failed"] == "0"
    assert _png_height(tmp_path / "series.png") == 1200  # two more panels than without server metrics
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["points"][0]["server_metrics"]["window"] == window
    assert rebuild(str(tmp_path))["points"][0]["server_metrics"] == metrics  # `report` keeps what was scraped


def test_a_third_party_prometheus_page_is_read_as_the_standard_says():
    with ThirdParty() as server:
        server.jobs.labels("a").inc(5)
        time.sleep(0.35)
        page = check(server.url, Selection(""))
        chosen = Selection("queue_*,job_seconds,nothing_*")
        only = check(server.url, chosen)
    assert page.values['jobs_processed_total{queue="a"}'] >= 5 + 20
    assert page.kinds['jobs_processed_total{queue="a"}'] == "counter"
    assert page.values["queue_depth"] == 42 and page.kinds["queue_depth"] == "gauge"
    assert page.kinds["job_seconds_count"] == page.kinds["job_seconds_sum"] == "counter"
    assert page.values["poll_seconds_sum"] == 0.5 and page.values["poll_seconds_count"] == 1
    assert not any(key.endswith("_created") for key in page.values)  # timestamps, not measures
    buckets = page.buckets["job_seconds"]
    assert set(buckets) == {0.01, 0.05, 0.1, 1.0, float("inf")} and buckets[0.01] == 0 and buckets[0.05] >= 3
    assert 0.01 < quantile(0.5, buckets) <= 0.05
    assert set(only.kinds) == {"queue_depth", "job_seconds_sum", "job_seconds_count"} and set(only.buckets) == {
        "job_seconds"}  # fmt: skip
    assert chosen.unmatched() == ["nothing_*"]


class _Timeline:
    """A run's progress hooks that make the endpoint hang 0.7 s into the point and die at 1.3 s."""

    def __init__(self, server: ThirdParty) -> None:
        self.server = server

    def point(self, label: str, total: int | None, seconds: float | None) -> None:
        threading.Timer(0.7, lambda: setattr(self.server, "mode", "hang")).start()
        threading.Timer(1.3, self.server.die).start()

    def note(self, text: str) -> None:
        pass

    def record(self, record: dict) -> None:
        pass

    def sample(self, sample: dict) -> None:
        pass


def test_an_endpoint_that_hangs_then_dies_leaves_the_run_whole_with_its_failures_counted(tmp_path, own_processes):
    with ThirdParty() as server:
        options = Options(calibrate=False, concurrency=[4], duration=2.0, output_tokens="20",
                          server_metrics=server.url, server_metrics_interval=0.2)  # fmt: skip
        point = run(options, str(tmp_path), _Timeline(server))["points"][0]
    metrics = point["server_metrics"]
    # 4 streams of 150 ms requests went on to the point's end, never waiting on the endpoint
    assert point["summary"]["outcomes"]["ok"] == point["summary"]["requests"] > 25
    with open(tmp_path / "records.jsonl") as f:
        assert max(json.loads(line)["end"] for line in f) < options.duration + 0.5
    assert 2 <= metrics["scrapes"] <= 5 and metrics["failed"] >= 4, describe(metrics)
    assert set(metrics["failures"]) <= {"timed out", "connection refused"}, metrics["failures"]
    assert "timed out" in metrics["failures"] and "connection refused" in metrics["failures"]
    assert metrics["window"]["queue_depth"]["mean"] == 42
    assert metrics["window"]['jobs_processed_total{queue="a"}']["rate"] == pytest.approx(100, rel=0.3)
    assert f"{metrics['failed']} failed" in describe(metrics)


def test_an_endpoint_that_is_no_use_is_refused_before_anything_runs(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    dead = f"http://127.0.0.1:{closed.getsockname()[1]}/metrics"
    cli = CliRunner()
    with closed:
        result = cli.invoke(loadtest, ["--server-metrics", dead, "-o", str(tmp_path / "a"), "--no-calibrate"])
    assert result.exit_code == 2 and "did not answer (connection refused)" in result.output, result.output
    assert not os.path.exists(tmp_path / "a")
    with ThirdParty() as server:
        server.mode = "html"
        result = cli.invoke(loadtest, ["--server-metrics", server.url, "-o", str(tmp_path / "b"), "--no-calibrate"])
    assert result.exit_code == 2 and "not with Prometheus text" in result.output, result.output
    for args, says in ((["--server-metrics", "localhost:8000"], "URL"),
                       (["--target", "openai", "--server-metrics", "target"], "serves no metrics"),
                       (["--server-metrics", "target", "--server-metrics-interval", "0"], "at least 0.1 seconds"),
                       (["--server-metrics-series", "vllm:*"], "give that too")):  # fmt: skip
        result = cli.invoke(loadtest, args)
        assert result.exit_code == 2 and says in result.output, (args, result.output)


@pytest.fixture(scope="module")
def fast_and_slow(tmp_path_factory):
    """Two sweeps over the same concurrencies, the second against a fake 10 times slower per token."""
    dirs = []
    for name, gap in (("fast", 0.002), ("slow", 0.02)):
        out = str(tmp_path_factory.mktemp(name))
        run(Options(calibrate=False, concurrency=[2, 4], requests=8, output_tokens="10", fake_gap=gap,
                    slo="e2e=1"), out)  # fmt: skip
        dirs.append(out)
    return dirs


COMPARE = pytest.mark.xdist_group("loadtest-compare")  # the tests of the two sweeps on one worker: swept once


@COMPARE
def test_compare_shows_the_slower_run_slower_point_by_point(fast_and_slow, tmp_path):
    fast, slow = fast_and_slow
    result = CliRunner().invoke(loadtest, ["compare", fast, slow, "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.output)
    assert [r["dir"] for r in comparison["runs"]] == [fast, slow] and all(r["finished"] for r in comparison["runs"])
    assert [p["label"] for p in comparison["points"]] == ["c=2", "c=4"]
    for point in comparison["points"]:
        m = point["metrics"]
        # 9 gaps of 20 ms instead of 2 ms: about 160 ms more from end to end, 18 ms more between tokens
        assert 100 < m["e2e_p50_ms"]["diff"][1] < 400 and m["e2e_p50_ms"]["pct"][1] > 50, m["e2e_p50_ms"]
        assert 12 < m["itl_p50_ms"]["diff"][1] < 30, m["itl_p50_ms"]
        assert m["e2e_p50_ms"]["diff"][1] == pytest.approx(m["e2e_p50_ms"]["values"][1] - m["e2e_p50_ms"]["values"][0])
        assert m["requests_per_s"]["diff"][1] < 0 and m["output_tokens_per_s"]["pct"][1] < -20
        assert m["stalls"]["values"] == [0, 0] and m["errors"]["diff"] == [None, 0]
        assert m["goodput_per_s"]["values"][1] > 0  # within e2e=1 s, both
    for plot in ("compare-latency.png", "compare-throughput.png"):
        assert _png_height(tmp_path / plot) > 0
    table = CliRunner().invoke(loadtest, ["compare", fast, slow, "--out", str(tmp_path)])
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if "end to end p50 ms" in line)
    assert "(+" in row and "%)" in row, row  # slower: a positive difference, in ms and per cent


@COMPARE
def test_compare_takes_a_killed_run(fast_and_slow, tmp_path, own_processes):
    fast, _ = fast_and_slow
    killed = str(tmp_path / "killed")
    kill_a_run(killed, ["-c", "2,4", "-n", "5000", "--output-tokens", "10", "--fake-gap", "0.002", "--no-calibrate"],
               4_000)  # fmt: skip
    result = CliRunner().invoke(loadtest, ["compare", fast, killed, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "killed" in result.output and "1 of its 2 points" in result.output, result.output
    comparison = compare([fast, killed])
    c2, c4 = comparison["points"]
    assert c2["in"] == [True, True] and c4["in"] == [True, False]
    assert c2["metrics"]["requests_per_s"]["values"][1] > 0 and c4["metrics"]["requests_per_s"]["diff"] == [None, None]


@COMPARE
def test_compare_refuses_runs_that_cannot_be_matched(fast_and_slow, tmp_path, own_processes):
    fast, _ = fast_and_slow
    rate = str(tmp_path / "rate")
    run(Options(calibrate=False, rate=[20.0], requests=4, output_tokens="5"), rate)
    for dirs, says in (([fast, rate], "swept different loads"), ([fast, str(tmp_path)], "no records.jsonl"),
                       ([fast], "two or more")):  # fmt: skip
        result = CliRunner().invoke(loadtest, ["compare", *dirs, "--out", str(tmp_path)])
        assert result.exit_code == 2 and says in result.output, (dirs, result.output)
    # a run directory edited by hand: an error that says so, from compare and report, not a traceback
    damaged = tmp_path / "damaged"
    for results, records in (("{not json", None), ("[1, 2]", None), ('{"points": 5}', None),
                             (None, '{"foo": 1}\n'), (None, '[1]\n'), (None, '{"point": "zero"}\n')):  # fmt: skip
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(fast, damaged)
        if results is not None:
            (damaged / "results.json").write_text(results)
        if records is not None:
            (damaged / "records.jsonl").write_text(records)
        for args in (["compare", fast, str(damaged)], ["report", str(damaged)]):
            result = CliRunner().invoke(loadtest, args)
            assert result.exit_code in (1, 2) and "edited by hand" in result.output, (results, records, result.output)


def test_a_page_that_never_ends_or_is_too_large_is_refused_in_bounded_time_and_memory(tmp_path):
    """A socket's timeout is per read: a page sent a byte a second never timed out and hung the run
    before it began; a 500 MB page was read whole (2.7 GB). Both are scrape failures now."""

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/plain"})
        await response.prepare(request)
        for _ in range(60):
            await response.write(b"#")
            await asyncio.sleep(0.2)
        return response

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/plain"})
        await response.prepare(request)
        line = b"# padding " + b"x" * 1000 + b"\n"
        for _ in range(20 * 1024):  # 20 MB
            await response.write(line)
        return response

    app = web.Application()
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/huge", huge)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(EndpointError, match="did not answer"):
            check(url + "/trickle", Selection(""))
        assert time.monotonic() - started < 8
        with pytest.raises(EndpointError, match="larger than 16 MiB"):
            check(url + "/huge", Selection(""))
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
