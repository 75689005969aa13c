"""A profile's deployments: one worker group each, traffic split by the profile's strategy, and a
profile without deployments exactly as before. Two fake providers tell the deployments apart."""

from __future__ import annotations

import pytest

from broker import Pool
from broker.config import load_settings
from broker.fake_provider import FAULT_HEADER, LATENCY_HEADER, FakeProviderProcess
from broker.server.routing import Router

from .conftest import TEST_SETTINGS, openai_args

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker


@pytest.fixture(scope="module")
def fakes():
    with FakeProviderProcess() as a, FakeProviderProcess() as b:
        yield a, b


def deployments_pool(fakes, strategy: str, deployment_a: dict | None = None, **extra):
    a, b = fakes
    deps = [
        {"name": "a", "base_url": a.url + "/v1", "weight": 3, **(deployment_a or {})},
        {"name": "b", "base_url": b.url + "/v1", "weight": 1},
    ]
    profile = {"kind": "openai", "deployments": deps, "strategy": strategy, "min_workers": 1, "spare_workers": 0,
               "max_workers": 2, **extra}  # fmt: skip
    return Pool(profiles={"openai": profile}, **TEST_SETTINGS)


def served(fakes) -> list[int]:
    return [f.stats()["completed"] for f in fakes]


def test_weighted_deployments_split_calls_by_weight(fakes):
    for f in fakes:
        f.reset()
    with deployments_pool(fakes, "weighted") as pool, pool.client() as client:
        for i in range(20):
            assert client.request("openai", "chat.completions.create", **openai_args(f"call {i}")).status == 200
        workers = client.snapshot().workers
    assert served(fakes) == [15, 5]
    assert {(w.deployment, w.ident.rsplit(".", 2)[0]) for w in workers} == {("a", "openai.a"), ("b", "openai.b")}


def test_ordered_deployments_use_the_first_until_it_is_full(fakes):
    for f in fakes:
        f.reset()
    slow = {"extra_headers": {LATENCY_HEADER: "ttft=1.0"}}
    with deployments_pool(fakes, "ordered", max_workers=1) as pool, pool.client() as client:
        for i in range(4):
            assert client.request("openai", "chat.completions.create", **openai_args(f"first {i}")).status == 200
        assert served(fakes) == [4, 0]
        calls = [client.submit("openai", "chat.completions.create", **openai_args(f"both {i}"), **slow)
                 for i in range(2)]  # fmt: skip
        assert [c.result().status for c in calls] == [200, 200]
    assert served(fakes) == [5, 1]  # the second while the first deployment's one worker was busy


def test_least_busy_picks_the_emptier_deployment_and_ties_go_in_list_order():
    s = load_settings(env={}, profiles={"p": {"kind": "openai", "deployments": [{"name": "x"}, {"name": "y"}]}})
    router = Router(s)
    load = {"p.x": 0.5, "p.y": 0.25}
    assert router.pick("p", ["p.x", "p.y"], load.get, 0.0, "m") == "p.y"
    assert router.pick("p", ["p.x", "p.y"], dict.fromkeys(load, 0.0).get, 0.0, "m") == "p.x"
    assert router.pick("p", ["p.x", "p.y"], load.get, 0.0, "m", frozenset({"p.y"})) == "p.x"  # not the one it failed on
    assert (
        router.pick("p", ["p.y"], load.get, 0.0, "m", frozenset({"p.y"})) == "p.y"
    )  # ... unless it is the only one free


def test_a_profile_without_deployments_keeps_its_idents_and_stats(client):
    workers = client.snapshot().workers
    assert workers and all(w.deployment == "" and w.ident.split(".")[0] == w.profile for w in workers)
    assert all(len(w.ident.split(".")) == 3 for w in workers)
    assert client.snapshot().capacity == {"anthropic": 8, "openai": 8}


def test_a_failing_key_is_left_for_another_deployment_at_once(fakes):
    for f in fakes:
        f.reset()
    down = {"default_headers": {FAULT_HEADER: "unavailable:for=600"}}  # deployment a's upstream answers 503
    with deployments_pool(fakes, "ordered", deployment_a=down) as pool, pool.client() as client:
        call = client.submit("openai", "chat.completions.create", **openai_args("a is down"))
        assert call.result().status == 200
        served = call.served
    assert (served.deployment, served.attempts, served.rescue) == ("b", 2, "deployment")
    assert [sum(map(len, f.stats()["arrivals"].values())) for f in fakes] == [1, 1]  # no backoff wait on a
