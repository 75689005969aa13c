"""memory: unique memory (USS) of N idle workers (N = 1, 16, 64), with the zygote and the
broker, and of one worker before and after 10,000 requests (copy-on-write growth).

Target: memory growing by <= 10 MB per extra worker."""

from __future__ import annotations

import statistics
import time
from typing import Any

from broker import Pool
from broker.fake_provider import FakeProviderProcess

from .common import pick, result, target, uss

ASK = {"model": "claude-bench", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
MB = 2**20


def idle(url: str, n: int) -> dict[str, Any]:
    profile = {"kind": "anthropic", "base_url": url, "min_workers": n, "max_workers": n, "spare_workers": 0}
    with Pool(profiles={"anthropic": profile}) as pool, pool.client() as client:
        time.sleep(0.5)
        stats = client.stats()
        workers = [uss([w["pid"]]) for w in stats["workers"]]
        return {
            "workers": n,
            "worker_uss_median_mb": round(statistics.median(workers) / MB, 2),
            "workers_uss_total_mb": round(sum(workers) / MB, 1),
            "zygote_uss_mb": round(uss([stats["zygote_pid"]]) / MB, 2),
            "broker_uss_mb": round(uss([pool.pid]) / MB, 2),
            "total_uss_mb": round((sum(workers) + uss([stats["zygote_pid"], pool.pid])) / MB, 1),
        }


def growth(url: str, requests: int) -> dict[str, Any]:
    """One worker serving `requests` requests, half of them streams."""
    profile = {"kind": "anthropic", "base_url": url, "min_workers": 1, "max_workers": 1, "spare_workers": 0}
    with Pool(profiles={"anthropic": profile}) as pool, pool.client() as client:
        pid = client.stats()["workers"][0]["pid"]
        before = uss([pid])
        samples = []
        for i in range(requests):
            if i % 2:
                client.request("anthropic", "messages.create", **ASK)
            else:
                for _ in client.submit("anthropic", "messages.create", stream=True, **ASK):
                    pass
            if (i + 1) % max(1, requests // 10) == 0:
                samples.append(round(uss([pid]) / MB, 2))
        after = uss([pid])
        assert client.stats()["workers"][0]["pid"] == pid, "the measured worker was replaced"
    return {"requests": requests, "before_mb": round(before / MB, 2), "after_mb": round(after / MB, 2),
            "growth_mb": round((after - before) / MB, 2), "samples_mb": samples}  # fmt: skip


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    counts = pick(size, [1, 16, 64], [1, 16], [1, 2])
    requests = pick(size, 10_000, 1_000, 30)
    with FakeProviderProcess() as fake:
        rows = [idle(fake.url, n) for n in counts]
        grown = growth(fake.url, requests)
    first, last = rows[0], rows[-1]
    per_worker = round((last["total_uss_mb"] - first["total_uss_mb"]) / (last["workers"] - first["workers"]), 2)
    figures = {"idle": rows, "per_extra_worker_mb": per_worker, "after_requests": grown}
    targets = [target("memory per extra worker (MB)", per_worker, "<= 10", lambda v: v <= 10)]
    return result({"workers": counts, "requests": requests}, figures, targets, started)


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    f = data["figures"]
    rows = [[r["workers"], r["worker_uss_median_mb"], r["total_uss_mb"], r["zygote_uss_mb"], r["broker_uss_mb"]]
            for r in f["idle"]]  # fmt: skip
    g = f["after_requests"]
    rows.append([f"1 after {g['requests']} requests", f"{g['before_mb']} -> {g['after_mb']}", None, None, None])
    return ["workers", "worker USS MB", "total USS MB", "zygote MB", "broker MB"], rows
