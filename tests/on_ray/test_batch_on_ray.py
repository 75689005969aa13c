"""Batch jobs on a Ray cluster: three local nodes on 127.0.0.1, one pool actor each, the
driver as the single writer. Same output as a local run under stalls; a node SIGKILLed
mid-run loses nothing and its re-run items are counted as the fake provider served them;
a SIGKILLed driver resumes; without Ray, a clear error and nothing sent; the nodes'
metrics agree with the summary.

The three-node cluster is this package's (see conftest.py). Run them with `-m ray -n 0` (`pytest`
alone leaves them out)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from broker import Pool
from broker.batch import RayOptions, run
from broker.batch.localcluster import alive
from broker.config import load_settings
from broker.fake_provider import FakeProviderProcess
from broker.fake_provider.content import Reply
from broker.fake_provider.server import Latency

from ..conftest import TEST_SETTINGS, profiles, wait_for
from ..test_batch import ISOPOOL, anthropic_lines, read_jsonl, write_jsonl
from ..test_metrics import scrape

# one worker runs the one cluster. The stalled run's set-up (the cluster's start, a local run and a cluster run)
# took 105 s in CI with the other workers busy: 300 s is still a hang guard, 120 s was a coin toss
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray"), pytest.mark.timeout(300)]

# a stall cut after 1 s without events (the fakes send one every 2-50 ms). The injected stalls come after the
# first event, so the first-event limit only needs to spare healthy streams: at 2 s, CI cut two of them while
# the nodes' pools were starting workers on two cores
LIMITS = dict(first_event_timeout=10.0, stale_timeout=1.0, max_attempts=5)
TOKENS = 20  # the fakes' answer length, so that every answer can be checked with `Reply`
STALLED = 30  # every tenth of the 300 items
# Healthy streams a loaded machine starves past the 1 s limit are real stalls to the pool: cut, retried and
# counted like the injected ones (CI at load 13 cut two). More than this many means the pool cuts healthy streams.
STARVED_AT_MOST = 6


def node_settings(url: str, min_workers: int = 2, max_workers: int = 4, **limits: float):
    """The Anthropic profile alone: every line is a Messages request (an OpenAI profile would start half of
    each pool's workers and import its SDK in each zygote, on every node, for nothing)."""
    anthropic = profiles(url, min_workers=min_workers, max_workers=max_workers)["anthropic"]
    return load_settings(profiles={"anthropic": anthropic}, **{**TEST_SETTINGS, **LIMITS, **limits})


def check_answers(results: list[dict], lines: list[dict]) -> None:
    """Every id exactly once, and each answer the one the fake gives that request."""
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines) and len(set(ids)) == len(ids)
    params = {line["custom_id"]: line["params"] for line in lines}
    for record in results:
        message = record["result"]["message"]
        assert message["content"][0]["text"] == Reply(params[record["custom_id"]], TOKENS).text


def total(scraped: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in scraped.items() if n == name and want <= set(lab))


@pytest.fixture(scope="package")  # package: kept while xdist interleaves the package's two modules
def stalled_run(cluster, tmp_path_factory):
    """300 items, every tenth stalling once, run locally and on the cluster; the cluster's
    nodes are scraped mid-run and as the last answer is written."""
    tmp = tmp_path_factory.mktemp("ray-stalls")
    lines = anthropic_lines(300)
    for line in lines[::10]:
        line["params"]["model"] = "claude-fake@stall-ping:after=1,interval=0.05"
    source = write_jsonl(tmp / "in.jsonl", lines)
    with FakeProviderProcess(Latency(ttft=0.02, gap=0.002, tokens=TOKENS)) as fake:
        with Pool(node_settings(fake.url, max_workers=12)) as pool:  # as many slots as the three nodes
            local = run(source, str(tmp / "local.jsonl"), pool=pool)
        served_locally = fake.stats()
        fake.reset()
        nodes: dict = {}
        scrapes: list[dict] = []
        written = []

        def on_result(record: dict) -> None:
            written.append(record["custom_id"])
            if len(written) in (150, 300) and nodes:  # mid-run, and with the last answer in (the pools still up)
                scrapes.append({name: scrape(n["metrics_url"]) for name, n in nodes.items() if not n["lost"]})

        options = RayOptions(cluster.address, per_node_concurrency=4, metrics_port=0, settings=node_settings(fake.url))
        summary = run(source, str(tmp / "ray.jsonl"), ray=options, on_result=on_result,
                      on_status=lambda status: nodes.update(status["nodes"]))  # fmt: skip
        served = fake.stats()
    return dict(lines=lines, tmp=tmp, local=local, summary=summary, served=served, served_locally=served_locally,
                scrapes=scrapes)  # fmt: skip


def check_stalls(summary, served: dict) -> None:
    """Each injected stall fired once and was cut and retried once; every retry the fake saw is a stall the pool
    recovered, and nothing else ran twice."""
    assert served["faults"] == {"stall-ping": STALLED}
    assert summary.stalls_recovered == summary.retries == served["repeated"]
    assert STALLED <= summary.stalls_recovered <= STALLED + STARVED_AT_MOST


def test_300_items_with_stalls_give_the_local_runners_output(stalled_run):
    tmp, local, summary = stalled_run["tmp"], stalled_run["local"], stalled_run["summary"]
    assert sorted(open(tmp / "ray.jsonl")) == sorted(open(tmp / "local.jsonl"))  # byte for byte, line for line
    check_answers(read_jsonl(tmp / "ray.jsonl"), stalled_run["lines"])
    assert summary.ok == local.ok == 300 and summary.failed == 0
    check_stalls(local, stalled_run["served_locally"])
    check_stalls(summary, stalled_run["served"])  # retried in their nodes: the driver re-ran nothing
    assert len(summary.nodes) == 3 and not any(n.lost for n in summary.nodes.values())
    assert all(n.done > 0 for n in summary.nodes.values())  # every node took a share
    assert sum(n.done for n in summary.nodes.values()) == 300
    assert sum(n.stalls_recovered for n in summary.nodes.values()) == summary.stalls_recovered
    assert summary.reexecuted == 0


def test_node_metrics_scraped_during_the_run_match_the_summary(stalled_run):
    summary, scrapes = stalled_run["summary"], stalled_run["scrapes"]
    assert len(scrapes) == 2, "scraped mid-run and at the end"
    mid, end = scrapes
    assert set(end) == set(summary.nodes)
    for name, node in summary.nodes.items():
        assert total(end[name], "isopool_requests_total", outcome="ok") == node.done
        assert total(end[name], "isopool_stalls_total") == node.stalls_recovered
        assert total(end[name], "isopool_retries_total") == node.retries
        assert total(end[name], "isopool_stalls_total", kind="stale_timeout") == node.stalls_recovered  # after 1 event
        assert total(end[name], "isopool_worker_kills_total", reason="stale_timeout") == node.stalls_recovered
        assert total(mid[name], "isopool_requests_total") <= total(end[name], "isopool_requests_total")
    assert 150 <= sum(total(s, "isopool_requests_total", outcome="ok") for s in mid.values()) < 300  # mid-run
    assert sum(total(s, "isopool_stalls_total") for s in end.values()) == summary.stalls_recovered >= STALLED
    assert sum(total(s, "isopool_request_duration_seconds_count") for s in end.values()) == 300


def test_a_node_sigkilled_mid_run_loses_nothing_and_its_reruns_are_counted(cluster, tmp_path):
    lines = anthropic_lines(96)
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    # the fake holds every stream before its first event until all 12 slots hold one, however long the nodes'
    # pools take to start (the last came up after the two others had served all 96, at half speed): each item
    # dealt has reached the fake when the node is killed. Held is not stalled: no first-event limit cuts them.
    with FakeProviderProcess(Latency(ttft=0.1, gap=0.02, tokens=TOKENS)) as fake:
        fake.hold()
        driver = start_driver(cluster, fake, source, out, tmp_path, min_workers=4, first_event_timeout=300.0,
                              deadline=600.0)  # fmt: skip
        try:
            try:
                wait_for(lambda: fake.stats()["active"] == 12, 180, "every node's slots to hold a stream")
            except AssertionError:  # say how far it got, and what the driver said (one such run seen, not explained)
                driver.kill()
                held, said = fake.stats()["active"], driver.communicate()[1][-3000:]
                raise AssertionError(f"{held} of 12 slots held a stream at 180 s; the driver said:\n{said}") from None
            pool = cluster.kill_node(cluster.nodes[2])
            killed_at = time.time()
            cluster.add_node()  # a node that joins during the run gets an actor
            fake.hold(False)
            stdout, stderr = driver.communicate(timeout=120)
        finally:
            driver.kill()
        served = fake.stats()
    assert driver.returncode == 0, stderr
    summary = json.loads(stdout)
    check_answers(read_jsonl(out), lines)
    assert summary["ok"] == 96
    lost = [n for n in summary["nodes"].values() if n["lost"]]
    assert len(lost) == 1 and any(why in lost[0]["error"] for why in ("ActorDiedError", "ActorUnavailableError",
                                                                       "no longer alive"))  # fmt: skip
    assert summary["reexecuted"] == 4 == served["repeated"]  # its four in flight ran twice, and only those
    assert lost[0]["recovered_s"] is not None and lost[0]["lost_at"] - killed_at < 10
    *first, joiner = summary["nodes"].values()  # in the order the driver gave them actors
    assert len(first) == 3 and all(n["done"] > 0 for n in first if not n["lost"])
    # the joiner was given an actor, and its start did not fail; whether its pool was up, and items were left for
    # it, before the run ended depends on the machine's speed (done 0, and at half speed no pool yet, seen)
    assert not joiner["lost"] and joiner["error"] == "", joiner
    assert pool, "the killed node ran a pool"
    wait_for(lambda: not any(alive(pid) for pid in pool), 15, "the dead node's isopool processes to end")


def start_driver(cluster, fake, source: str, out, tmp_path, min_workers: int = 2, **limits: float) -> subprocess.Popen:
    """`isopool batch --ray` in its own process, its nodes' pools configured by a config file."""
    config = tmp_path / "isopool.toml"
    config.write_text(toml(node_settings(fake.url, min_workers=min_workers, **limits)))
    command = [ISOPOOL, "batch", source, "-o", str(out), "--ray", cluster.address, "--per-node-concurrency", "4",
               "--json"]  # fmt: skip
    env = dict(os.environ, ISOPOOL_CONFIG=str(config))
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_sigkilled_driver_resumes_with_the_same_command(cluster, tmp_path):
    lines = anthropic_lines(160)
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    with FakeProviderProcess(Latency(ttft=0.1, gap=0.01, tokens=TOKENS)) as fake:
        driver = start_driver(cluster, fake, source, out, tmp_path)
        try:
            wait_for(lambda: out.exists() and len(out.read_bytes().splitlines()) >= 30, 90, "30 results")
            pools = set().union(*(cluster.pool_processes(node) for node in cluster.nodes))
        finally:
            driver.kill()  # SIGKILL
            driver.communicate()
        assert pools, "the nodes ran pools for the driver"
        wait_for(lambda: not any(alive(pid) for pid in pools), 30, "the killed driver's node pools to end")
        before = len(out.read_bytes().splitlines())
        again = start_driver(cluster, fake, source, out, tmp_path)
        stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    summary = json.loads(stdout)
    assert 30 <= before < 160 and summary["already_done"] == before and summary["ok"] == 160 - before
    check_answers(read_jsonl(out), lines)


def test_without_ray_a_clear_error_and_nothing_is_sent(tmp_path, fake):
    source = write_jsonl(tmp_path / "in.jsonl", anthropic_lines(5))
    out = tmp_path / "out.jsonl"
    config = tmp_path / "isopool.toml"
    config.write_text(toml(node_settings(fake.url)))
    served = sum(fake.stats()["served"].values())
    no_ray = "import sys; sys.modules['ray'] = None; from broker.cli import main; main()"  # `import ray` fails
    result = subprocess.run([sys.executable, "-c", no_ray, "batch", source, "-o", str(out), "--ray", "auto"],
                            env=dict(os.environ, ISOPOOL_CONFIG=str(config)), capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert "--ray needs Ray, which is not installed: pip install 'isopool[ray]'" in result.stderr
    assert not out.exists() and sum(fake.stats()["served"].values()) == served


def test_ray_options_that_do_not_apply_are_refused_before_anything_runs(tmp_path, fake):
    source = write_jsonl(tmp_path / "in.jsonl", anthropic_lines(3))
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="concurrency, rpm cannot be used with ray"):
        run(source, str(out), ray="auto", concurrency=4, rpm=10)
    for extra in (["--per-node-concurrency", "4"], ["--ray", "auto", "--job", "x:y"], ["--ray", "auto", "-c", "4"]):
        result = subprocess.run([ISOPOOL, "batch", source, "-o", str(out), *extra], capture_output=True, text=True)
        assert result.returncode == 2 and "--ray" in result.stderr, result.stderr
    assert not out.exists()


RAY_CLUSTER_STARTED = "Ray cluster of 2 node(s) at "


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ray_cluster_starts_without_rays_temp_dir_is_found_by_auto_and_stops_on_a_signal(ray_extra, tmp_path, stop):
    """A new machine has no /tmp/ray, where Ray's `Cluster` writes the address that `--ray auto`
    reads whatever temp dir it is given. With $TMPDIR set, Ray's default dir is $TMPDIR/ray:
    an empty one here. Ctrl-C (SIGINT to the terminal's process group) or SIGTERM stops every
    process it started."""
    with ray_cluster(tmp_path, nodes=2) as (proc, out, err):
        wait_for(lambda: proc.poll() is not None or RAY_CLUSTER_STARTED in out.read_text(), 90, "the cluster")
        assert proc.poll() is None, err.read_text()
        assert raylets(proc.pid) == 2, "one raylet a node"
        children = psutil.Process(proc.pid).children(recursive=True)
        address = (tmp_path / "ray" / "ray_current_cluster").read_text()  # what `ray.init(address="auto")` reads
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    started = {p.pid for p in children}
    assert proc.returncode == 0, err.read_text()
    assert f"{RAY_CLUSTER_STARTED}{address}" in out.read_text()
    wait_for(lambda: not any(alive(pid) for pid in started), 15, "every process of the cluster to end")
    assert not (tmp_path / "ray" / "ray_current_cluster").exists()  # `auto` finds no stopped cluster


def test_ray_cluster_stopped_while_it_starts_ends_everything_at_once(ray_extra, tmp_path):
    """SIGTERM while the nodes start meets Ray's own handler, which drains a node for up to 30 s
    (for Ray Serve under Kubernetes) before it stops anything; a local cluster has nothing to drain."""
    with ray_cluster(tmp_path, nodes=3) as (proc, out, _):
        wait_for(lambda: raylets(proc.pid), 90, "the first node's raylet")
        started = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert RAY_CLUSTER_STARTED not in out.read_text(), "stopped while starting"
    wait_for(lambda: not any(alive(pid) for pid in started), 15, "every process of the cluster to end")


@contextlib.contextmanager
def ray_cluster(tmp_path, nodes: int):
    """`isopool ray-cluster` in its own session, its output in files, Ray's default temp dir under
    tmp_path; SIGKILLed with its whole session if it still runs when the block ends."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([ISOPOOL, "ray-cluster", "--nodes", str(nodes)],
                                env=dict(os.environ, TMPDIR=str(tmp_path)), stdout=stdout, stderr=stderr,
                                start_new_session=True, preexec_fn=default_sigint)  # fmt: skip
    try:
        yield proc, out, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def raylets(pid: int) -> int:
    return sum(p.name() == "raylet" for p in psutil.Process(pid).children(recursive=True))


def default_sigint() -> None:
    """Ctrl-C as at a terminal, even when these tests run in a background job (which ignores SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


FAILED_START = """
import psutil
from broker.batch.localcluster import LocalCluster, alive
try:
    LocalCluster(nodes=1)
except IsADirectoryError:
    print(sorted(p.pid for p in psutil.Process().children(recursive=True) if alive(p.pid)))
"""


def test_a_cluster_that_fails_to_start_leaves_no_process(ray_extra, tmp_path):
    """Ray's `Cluster` writes its address after the head's processes run; when that fails (here
    the address file is a directory), every process started so far is ended before the error."""
    (tmp_path / "ray" / "ray_current_cluster").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-c", FAILED_START], env=dict(os.environ, TMPDIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def toml(settings) -> str:
    """The settings as an isopool config file (what a user would write for the nodes)."""
    lines, tables = [], []
    for key, value in _fields(settings):
        if key == "profiles":
            for name, profile in value.items():
                body = [f"{k} = {json.dumps(v)}" for k, v in _fields(profile) if v is not None and v != {}]
                tables.append(f"[profiles.{name}]\n" + "\n".join(body))
        elif value not in (None, {}):
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines + tables) + "\n"


def _fields(struct) -> list[tuple[str, object]]:
    return [(name, getattr(struct, name)) for name in struct.__struct_fields__]
