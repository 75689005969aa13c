"""The benchmark suite runs end to end at tiny sizes and writes every field; speed is not
asserted here (that is what the benchmarks themselves report)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.__main__ import main as bench_main
from bench.common import target
from broker.fake_provider import LATENCY_HEADER, FakeProviderProcess, Latency

from .conftest import http_chunks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = ("overhead", "stream", "scale", "faults", "respawn", "memory", "loadgen", "onewrite", "rescue", "startup")
# Run by the test below, each on its own (`all` runs them too).
SIDE_BY_SIDE = {
    "shim": ["direct SDK", "shim", "bare hop", "bare broker"],  # the last two: bench/floor.py's references
    "gateway": ["direct SDK", "isopool gateway", "bare gateway", "LiteLLM proxy"],
}
POOL_COLUMNS = ("gateway+HTTP", "gateway+SDK(0)", "shim")


def _http_chunks(url: str, latency: str) -> list[bytes]:
    """The body of a streamed chat completion as the HTTP/1.1 chunks the server wrote (one per write)."""
    address = urlsplit(url)
    body = json.dumps({"model": "gpt-fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {address.netloc}\r\ncontent-type: application/json\r\n"
            f"{LATENCY_HEADER}: {latency}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(head.encode() + body.encode())
        return http_chunks(b"".join(iter(lambda: sock.recv(65536), b"")))


def test_the_fake_writes_each_unpaced_event_in_its_own_write_and_counts_them(fake):
    """Real servers write one token per write; a fake that batched them let a client look ~10x faster."""
    before = fake.stats()["chunks"]
    chunks = _http_chunks(fake.url, "tokens=40")
    assert len(chunks) > 40 and all(c.startswith(b"data: ") and c.count(b"\n\n") == 1 for c in chunks)
    assert fake.stats()["chunks"] - before == len(chunks)
    batched = _http_chunks(fake.url, "tokens=40,batched=true")
    assert len(batched) == 1 and b"".join(batched).count(b"\n\n") == len(chunks)


def test_a_batched_fake_process_writes_an_answer_at_once(own_processes):
    """`FakeProviderProcess(Latency(batched=True))` passes --batched on: it was silently dropped."""
    with FakeProviderProcess(Latency(batched=True)) as batched:
        assert len(_http_chunks(batched.url, "tokens=40")) == 1  # the header sets the length only


def tiny(name: str, tmp_path: Path, timeout: float) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m bench NAME --size tiny`, which must succeed: the run, and the JSON file it wrote."""
    results = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "-m", "bench", name, "--size", "tiny", "--json", str(results)],
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run, results


def _check_overhead(figures: dict) -> None:
    assert len(figures["rows"]) == 8 and all(r["pool"]["n"] == 8 for r in figures["rows"])
    assert figures["floor"]["zmq_round_trip_us"] > 0


def _check_stream(figures: dict) -> None:
    rows = figures["rows"]
    assert {(r["provider"], r["path"]) for r in rows} == {
        (p, path) for p in ("anthropic", "openai") for path in ("direct SDK", "pool client", "shim")
    }
    assert all(r["events"] >= 200 and r["events_per_s"] > 0 for r in rows)


def _check_scale(figures: dict) -> None:
    rows = figures["rows"]
    assert [r["concurrency"] for r in rows] == [1, 4] and all(r["pool_events_per_s"] > 0 for r in rows)


def _check_faults(figures: dict, inputs: dict) -> None:
    n = inputs["requests"]
    assert figures["clean_isopool"]["correct"] == n
    assert set(figures["contenders"]) == {"isopool", "plain SDK", "in-process watchdog", "pebble ProcessPool"}
    assert figures["contenders"]["isopool"]["correct"] == n  # every request answered correctly, faults or not
    assert figures["clean_isopool"]["cpu_s"] > 0 and figures["contenders"]["isopool"]["cpu_s"] > 0  # the work done
    assert figures["clean_isopool"]["stall_floor_s"] is None  # no request waited out a stall
    for r in figures["contenders"].values():
        assert r["correct"] + r["wrong"] + r["failed"] + r["hanging_at_cap"] + r["never_started"] <= n


def _check_respawn(figures: dict) -> None:
    assert figures["respawn_zygote"]["n"] == 2 and figures["detection_lateness"]["n"] == 2


def _check_memory(figures: dict) -> None:
    assert [r["workers"] for r in figures["idle"]] == [1, 2] and figures["after_requests"]["requests"] == 30


def _check_loadgen(figures: dict) -> None:
    rows = figures["rows"]
    assert [r["concurrency"] for r in rows] == [8]
    assert all(r["isopool_chunks_per_s"] > 0 and r["sdk_chunks_per_s"] > 0 and r["isopool_in_flight"] > 0 for r in rows)


def _check_onewrite(figures: dict) -> None:
    rows = figures["rows"]
    assert [r["concurrency"] for r in rows] == [8]
    assert all(r["bare_server_chunks_per_s"] > 0 and r["isopool_server_chunks_per_s"] > 0 for r in rows)


def _check_startup(figures: dict) -> None:
    for sdk in ("anthropic", "openai"):
        direct, run = figures[f"{sdk}_direct_answer"], figures[f"{sdk}_run_answer"]
        assert direct["n"] == run["n"] == 1 and 0 < direct["median_ms"] <= figures[f"{sdk}_direct_exit"]["median_ms"]


CHECKS: dict[str, Callable[[dict], None]] = {
    "overhead": lambda d: _check_overhead(d["figures"]),
    "stream": lambda d: _check_stream(d["figures"]),
    "scale": lambda d: _check_scale(d["figures"]),
    "faults": lambda d: _check_faults(d["figures"], d["inputs"]),
    "respawn": lambda d: _check_respawn(d["figures"]),
    "memory": lambda d: _check_memory(d["figures"]),
    "loadgen": lambda d: _check_loadgen(d["figures"]),
    "onewrite": lambda d: _check_onewrite(d["figures"]),
    "rescue": lambda d: _check_rescue(d),
    "startup": lambda d: _check_startup(d["figures"]),
    "shim": lambda d: _check_side_by_side("shim", d),
    "gateway": lambda d: _check_side_by_side("gateway", d),
}
PLOTTED = ("overhead", "stream", "scale", "faults", "memory")


@pytest.mark.timeout(300)  # one scenario at its tiny size: 5-40 s alone, more on busy cores
@pytest.mark.parametrize("name", [*SCENARIOS, *SIDE_BY_SIDE])
def test_a_scenario_writes_its_figures_and_its_report(name, tmp_path):
    """Each on its own (so the two test workers share them), then its section of the report."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("pebble")
    run, results = tiny(name, tmp_path, 280)
    data = json.loads(results.read_text())
    assert set(data) == {name}
    entry = data[name]
    assert {"inputs", "figures", "targets", "machine", "versions", "seconds", "size"} <= set(entry)
    assert entry["size"] == "tiny"
    assert entry["machine"]["cpus"] >= 1 and entry["versions"]["anthropic"] != "not installed"
    assert entry["targets"], f"{name} states no target"
    for t in entry["targets"]:
        assert set(t) == {"name", "value", "goal", "met", "bound"} and isinstance(t["met"], bool), t
        assert not (t["met"] and t["bound"]), t  # a floor is named only under a target missed
    assert name in run.stderr  # its table was printed
    CHECKS[name](entry)

    out = tmp_path / "report"
    # `python -m bench report`'s own main, in this process: no interpreter and matplotlib import per scenario
    assert bench_main(["report", "--json", str(results), "--out", str(out)]) == 0
    assert f"## {name}" in (out / "report.md").read_text()
    if name in PLOTTED:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _check_rescue(data: dict) -> None:
    """The rescue table's structure, and that the gateway and the shim rescued what has an answer
    while the plain SDK shows what they rescue from."""
    assert data["size"] == "tiny" and {t["name"] for t in data["targets"]} and data["notes"]
    cells = {row["fault"]: row["cells"] for row in data["figures"]["rows"]}
    assert list(cells) == ["http-500", "no-headers", "content-filter", "cut:after=6"]
    assert all(list(row) == [*POOL_COLUMNS, "plain SDK"] for row in cells.values())
    for column in POOL_COLUMNS:
        assert cells["http-500"][column]["outcome"] == "ok"  # retried on the primary
        assert cells["http-500"][column]["attempts"] == 2
        assert cells["no-headers"][column]["outcome"] == "ok"  # one headers_timeout, then the backup
        assert cells["no-headers"][column]["profile"] == "backup"
        assert cells["content-filter"][column]["outcome"] == "refusal"  # Anthropic's: an answer that refuses
        assert cells["content-filter"][column]["attempts"] == 1  # neither retried nor rerouted
        cut = cells["cut:after=6"][column]  # a stream cut after output: continued by prefill
        assert (cut["outcome"], cut["rescue"], cut["attempts"]) == ("ok", "prefill", 2), cut
    plain = {fault: row["plain SDK"]["outcome"] for fault, row in cells.items()}
    assert plain == {"http-500": "ok", "no-headers": "hung", "content-filter": "refusal", "cut:after=6": "TRUNCATED"}
    targets = {t["name"]: t for t in data["targets"]}
    assert targets["gateway and shim: truncated streams taken as success"]["value"] == 0
    assert targets["gateway and shim: calls over the 3-attempt budget"]["value"] == 0


def _check_side_by_side(name: str, data: dict) -> None:
    """Every call of issue 21 along the direct SDK and the pool's path (the LiteLLM proxy skipped, with its
    reason, at this size; the shim's floor references run), to the fake and to the plain server, with each
    process's CPU; the shim's median target names what the references added in the same run."""
    paths = SIDE_BY_SIDE[name]
    rows = data["figures"]["rows"]
    assert [(r["upstream"], r["kind"]) for r in rows] == [(u, k) for u in ("fake", "plain")
                                                          for k in ("latency",) * 3 + ("rate",) * 2]  # fmt: skip
    for row in rows:
        assert list(row["paths"]) == paths, row["call"]
        ran = {path: fig for path, fig in row["paths"].items() if "skipped" not in fig}
        assert list(ran) == [p for p in paths if p != "LiteLLM proxy"]  # no LiteLLM proxy at the tiny size
        for fig in ran.values():
            assert {"caller", "broker", "worker", "upstream"} <= set(fig["cpu_us"]) and fig["cpu_wait_us"] >= 0
            if row["kind"] == "latency":
                assert fig["n"] == 3 and 0 < fig["median_ms"] <= fig["p99_ms"] and "added_cpu_ms" in fig
            else:
                assert fig["events_per_s"] > 0 and fig["cpu_bound_events_per_s"] > 0
        if row["kind"] == "rate":  # through the pool, exactly the events the direct SDK reads
            assert len({fig["events"] for fig in ran.values()}) == 1 and next(iter(ran.values()))["events"] >= 100
    assert data["targets"] and all(t["name"].startswith(paths[1]) for t in data["targets"])
    medians = [t["goal"] for t in data["targets"] if t["name"].endswith("added median ms")]
    references = ("bare hop ", "bare broker ") if name == "shim" else ("bare gateway ",)
    assert medians and all("CPU added per call" in g and all(r in g for r in references) for g in medians)
    if name == "gateway":
        assert any(note.startswith("LiteLLM proxy skipped: not run at the tiny size") for note in data["notes"])


def test_a_target_missed_is_bounded_only_when_its_floor_misses_it_too():
    def p99(value: float, floor: float):
        return target("p99 ms", value, "<= 6.0", lambda v: v <= 6.0, ("bare gateway", floor))

    assert p99(5.0, 9.0).met and p99(5.0, 9.0).bound == "" and p99(5.0, 9.0).verdict() == "met"
    assert p99(7.0, 5.5).verdict() == "NOT met"  # the floor meets it: ours to fix
    assert p99(7.0, 9.13).verdict() == "NOT met, beyond the floor: bare gateway 9.13 misses it too; ours -2.13 from it"
    assert p99(20.0, 6.1).verdict().endswith("misses it too; ours +13.90 from it")  # the floor is not to blame for all
    assert target("events/s", None, ">= 0.9", lambda v: v >= 0.9).verdict() == "NOT met"
