"""Usage and cost accounting (issue 22): the tokens the broker bills, by profile/model and by client
connection, equal what the fake provider reported (its own count, `usage` in its stats) on every API
and path; an attempt that failed before output is billed nothing, one that stalled after output what
the provider had reported; the request log and the stats say it; no key anywhere."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import httpx2 as httpx
import msgspec
import pytest
from rich.console import Console

from broker import Pool, StreamStalled
from broker.batch import run
from broker.cli.top import frame
from broker.prices import PriceTable
from broker.prices import load as load_prices
from broker.protocol import Tokens
from broker.shim import anthropic as shim_anthropic

from .conftest import TEST_SETTINGS, anthropic_args, fault, needs_sdk, openai_args, wait_for
from .test_batch import anthropic_lines, write_jsonl
from .test_metrics import scrape
from .test_top import ISOPOOL

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped pools started once, on one worker

FIELDS = ("input", "output", "cache_read", "cache_write")
PRICES = 'date = 2026-01-15\n[models."claude-*"]\ninput = 3.0\noutput = 15.0\ncache_read = 0.3\n'
GATEWAY_TOKEN = "gateway-token-that-must-stay-secret"


def usage_pool(fake, **settings) -> Pool:
    profiles = {
        "anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 1},
        "openai": {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 1},
    }
    return Pool(profiles=profiles, **{**TEST_SETTINGS, "first_event_timeout": 1.0, "stale_timeout": 1.0, **settings})


@pytest.fixture(scope="module")
def pool(fake, tmp_path_factory):
    """The pool of the tests that need no price table: each counts what its own calls added (`since`, `logged`)."""
    log = tmp_path_factory.mktemp("usage") / "requests.jsonl"
    with usage_pool(fake, http="127.0.0.1:0", metrics="127.0.0.1:0", request_log=str(log)) as pool:
        yield pool


@pytest.fixture(scope="module")
def priced(fake, tmp_path_factory):
    """The pool with a price table and a gateway token: a cost is checked against its model's totals (every
    test's calls priced alike), and the one test that sends the token has the caller tallies to itself."""
    where = tmp_path_factory.mktemp("priced")
    (where / "prices.toml").write_text(PRICES)
    settings = {"prices": str(where / "prices.toml"), "metrics": "127.0.0.1:0", "http": "127.0.0.1:0",
                "gateway_token": GATEWAY_TOKEN, "request_log": str(where / "requests.jsonl")}  # fmt: skip
    with usage_pool(fake, **settings) as pool:
        yield pool


def reported(fake) -> dict[str, int]:
    return httpx.get(f"{fake.url}/_isopool/stats").json()["usage"]


def billed(tokens: dict[str, Tokens]) -> dict[str, int]:
    return {field: sum(getattr(t, field) for t in tokens.values()) for field in FIELDS}


def spent_since(fake, before: dict[str, int]) -> dict[str, int]:
    now = reported(fake)
    return {field: now[field] - before[field] for field in FIELDS}


def since(now: dict[str, Tokens], before: dict[str, Tokens]) -> dict[str, Tokens]:
    """What each tally of a shared pool gained since `before` (those that gained): the calls of one test."""
    gained = {}
    for key, tokens in now.items():
        was = before.get(key, Tokens())
        delta = {field: getattr(tokens, field) - getattr(was, field) for field in (*FIELDS, "attempts")}
        if any(delta.values()):
            cost = None if tokens.cost is None else round(tokens.cost - (was.cost or 0.0), 6)
            gained[key] = Tokens(**delta, cost=cost)
    return gained


def logged(pool: Pool) -> list[dict]:
    """The request log's lines, once it has one for each request the pool ended (its writer is a thread of its
    own): a test's are those after the ones there before it."""
    path = Path(pool.settings.request_log)

    def lines() -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    def ended() -> int:
        with pool.client() as client:
            return sum(n for outcome, n in client.stats()["requests"].items() if outcome != "accepted")

    wait_for(lambda: len(lines()) == ended(), what="a request log line for each request ended")
    return [json.loads(line) for line in lines()]


def test_every_api_is_billed_what_the_provider_reported(fake, pool, own_processes):
    with pool.client() as client:
        earlier, before = client.snapshot(), reported(fake)
        client.request("anthropic", "messages.create", **anthropic_args("usage plain"))
        list(client.submit("anthropic", "messages.create", stream=True, **anthropic_args("usage stream")))
        client.request("openai", "chat.completions.create", **openai_args("usage chat plain"))
        list(client.submit("openai", "chat.completions.create", stream=True, **openai_args("usage chat"),
                           stream_options={"include_usage": True}))  # fmt: skip
        list(client.submit("openai", "chat.completions.create", stream=True, **openai_args("usage chat, none asked")))
        snapshot = client.snapshot()
    spent, tokens = spent_since(fake, before), since(snapshot.tokens, earlier.tokens)
    assert spent["input"] > 0 and spent["output"] > 0
    assert billed(tokens) == spent
    anthropic_tokens, chat = tokens["anthropic/claude-fake"], tokens["openai/gpt-fake"]
    assert anthropic_tokens.attempts == 2 and chat.attempts == 2  # the stream without include_usage reported none
    by_client = since(snapshot.tokens_by_client, earlier.tokens_by_client)
    assert list(by_client.values()) == [msgspec.structs.replace(anthropic_tokens, **{
        f: getattr(anthropic_tokens, f) + getattr(chat, f) for f in (*FIELDS, "attempts")})]  # fmt: skip
    assert snapshot.prices == "" and anthropic_tokens.cost is None


@needs_sdk("responses")
def test_the_responses_api_is_billed_what_the_provider_reported(fake, pool, own_processes):
    with pool.client() as client:
        earlier, before = client.snapshot(), reported(fake)
        client.request("openai", "responses.create", model="gpt-fake", input="usage responses plain")
        list(client.submit("openai", "responses.create", stream=True, model="gpt-fake", input="usage responses"))
        snapshot = client.snapshot()
    tokens = since(snapshot.tokens, earlier.tokens)
    assert billed(tokens) == spent_since(fake, before) and tokens["openai/gpt-fake"].attempts == 2


def test_a_failed_attempt_is_billed_only_what_its_provider_reported(fake, pool, own_processes):
    with pool.client() as client:
        earlier, before, seen = client.snapshot(), reported(fake), len(logged(pool))
        list(client.submit("anthropic", "messages.create", stream=True, **anthropic_args("usage, stall first"),
                           **fault("stall-first:interval=0.05")))  # fmt: skip
        with pytest.raises(StreamStalled):
            list(client.submit("anthropic", "messages.create", stream=True, **anthropic_args("usage, seen stall"),
                               **fault("stall-ping:after=4,interval=0.05")))  # fmt: skip
        client.request("anthropic", "messages.create", **anthropic_args("usage, 429"), **fault("http-429"))
        snapshot = client.snapshot()
    spent, tokens = spent_since(fake, before), since(snapshot.tokens, earlier.tokens)
    assert billed(tokens) == spent
    assert tokens["anthropic/claude-fake"].attempts == 3  # of 5: the first stall and the 429 reported none
    retried, stalled, throttled = logged(pool)[seen:]
    assert [a["usage"] for a in retried["attempts"]][0] is None and retried["usage"]["attempts"] == 1
    assert stalled["attempts"][0]["outcome"] == "stale_timeout" and stalled["usage"]["output"] == 1  # message_start's
    assert stalled["usage"]["input"] > 0
    assert [a["outcome"] for a in throttled["attempts"]] == ["http_429", "ok"] and throttled["attempts"][0][
        "usage"
    ] is None
    lines = [retried, stalled, throttled]
    assert {f: sum(line["usage"][f] for line in lines) for f in FIELDS} == spent


def test_usage_is_kept_per_client_connection_through_the_shim_and_the_gateway(fake, pool, own_processes):
    with pool.client() as client:
        earlier, before = client.snapshot(), reported(fake)
        client.request("anthropic", "messages.create", **anthropic_args("usage, low-level client"))
    shim = shim_anthropic.Anthropic(pool=pool)
    try:
        shim.messages.create(**anthropic_args("usage, shim"))
    finally:
        shim.close()
    answer = httpx.post(f"{pool.http_url}/v1/messages", json=anthropic_args("usage, gateway"), timeout=30)
    assert answer.status_code == 200
    with pool.client() as client:
        snapshot = client.snapshot()
        stats = json.dumps(client.stats())
    spent, by_client = spent_since(fake, before), since(snapshot.tokens_by_client, earlier.tokens_by_client)
    assert billed(since(snapshot.tokens, earlier.tokens)) == spent == billed(by_client)
    assert sorted(t.attempts for t in by_client.values()) == [1, 1, 1]  # three connections
    assert os.environ["ANTHROPIC_API_KEY"] not in stats and "usage, shim" not in stats


def test_a_price_table_gives_the_cost_per_model(priced, own_processes):
    with priced.client() as client:
        client.request("anthropic", "messages.create", **anthropic_args("usage, priced"))
        client.request("openai", "chat.completions.create", **openai_args("usage, not priced"))
        snapshot, stats, scraped = client.snapshot(), client.stats(), scrape(priced.metrics_url)
        table = subprocess.run([ISOPOOL, "stats", "--url", priced.url], capture_output=True, text=True, timeout=30,
                               env={**os.environ, "COLUMNS": "200"}).stdout  # fmt: skip
    claude, gpt = snapshot.tokens["anthropic/claude-fake"], snapshot.tokens["openai/gpt-fake"]
    plain = claude.input - claude.cache_read - claude.cache_write
    want = (plain * 3.0 + claude.output * 15.0 + claude.cache_read * 0.3 + claude.cache_write * 3.0) / 1e6
    assert claude.cost == pytest.approx(want) and claude.cost > 0
    assert snapshot.prices == f"{priced.settings.prices} (USD, 2026-01-15)"
    # a model with no price has no cost (found by verify22: it showed 0.0), as in the request log
    assert gpt.cost is None and stats["tokens"]["openai/gpt-fake"]["cost"] is None
    assert [labels for name, labels in scraped if name == "isopool_cost_total"] == [
        (("model", "claude-fake"), ("profile", "anthropic"))
    ]
    rows = {model: line for line in table.splitlines() for model in ("claude-fake", "gpt-fake") if model in line}
    assert f"{claude.cost:.3g}" in rows["claude-fake"] and rows["gpt-fake"].rstrip(" │").endswith("—")


def test_a_price_table_that_cannot_be_read_is_refused_at_start(tmp_path):
    bad = tmp_path / "prices.toml"
    bad.write_text('[models."claude-*"]\ninput = 3\noutput = 15\n[models."gpt-4*"]\ninput = "three"\n')
    with pytest.raises(Exception, match=r"setting prices: .*models\.\"gpt-4\*\""):  # found by verify22: no glob
        Pool(profiles={"anthropic": {"kind": "anthropic"}}, prices=str(bad))
    with pytest.raises(Exception, match="setting prices: cannot read"):
        Pool(profiles={"anthropic": {"kind": "anthropic"}}, prices=str(tmp_path / "missing.toml"))


def test_stats_prometheus_top_and_the_batch_summary_show_the_tokens(fake, pool, tmp_path, own_processes):
    with pool.client() as client:
        earlier, before = client.snapshot(), reported(fake)
        source = write_jsonl(tmp_path / "in.jsonl", anthropic_lines(3))
        summary = run(source, str(tmp_path / "out.jsonl"), pool=pool)
        snapshot, scraped = client.snapshot(), scrape(pool.metrics_url)
        table = subprocess.run([ISOPOOL, "stats", "--url", pool.url], capture_output=True, text=True, timeout=30,
                               env={**os.environ, "COLUMNS": "200"})  # fmt: skip
        as_json = json.loads(subprocess.run([ISOPOOL, "stats", "--json", "--url", pool.url], capture_output=True,
                                            text=True, timeout=30).stdout)  # fmt: skip
    spent, gained = spent_since(fake, before), since(snapshot.tokens, earlier.tokens)
    assert summary.tokens == spent == billed(gained) and spent["output"] > 0
    claude = snapshot.tokens["anthropic/claude-fake"]  # the pool's totals, as each view shows them
    for kind in FIELDS:
        labels = (("model", "claude-fake"), ("profile", "anthropic"), ("type", kind))
        assert scraped[("isopool_tokens_total", labels)] == getattr(claude, kind)
    assert as_json["tokens"]["anthropic/claude-fake"] == msgspec.to_builtins(claude)
    # (not the row of its circuit, listed once another test's calls failed)
    row = next(line for line in table.stdout.splitlines() if "claude-fake" in line and "circuit" not in line)
    assert "anthropic / claude-fake" in row and f"{claude.output:,}" in row and f"{claude.input:,}" in row
    screen = Console(file=io.StringIO(), width=200)
    screen.print(frame(snapshot, earlier, 2.0, live=False))
    new = gained["anthropic/claude-fake"]  # the rates are this test's
    assert f"{(new.input + new.output) / 2:.0f} tokens/s" in screen.file.getvalue()


@pytest.mark.parametrize("price", ["-3.0", "nan", "inf", "1e300"])
def test_a_price_that_is_no_price_is_refused_at_load(tmp_path, price):
    """Found by the session-27 review: a negative price made costs go down (a counter reset to Prometheus),
    nan or inf made a model's cost nan or inf for good."""
    path = tmp_path / "prices.toml"
    path.write_text(f'[models."*"]\ninput = {price}\noutput = 1.0\n')
    with pytest.raises(ValueError, match="setting prices"):
        load_prices(str(path))


def test_a_price_table_that_is_not_utf8_names_the_setting(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_bytes(b'date = "\xff"\n[models."*"]\ninput = 1\noutput = 1\n')
    with pytest.raises(ValueError, match="setting prices: .* is not TOML"):
        load_prices(str(path))


def test_a_gateway_tokens_calls_are_accounted_to_a_hash_of_it_never_to_the_token(fake, priced, own_processes):
    token, log = GATEWAY_TOKEN, Path(priced.settings.request_log)
    name = f"token:{hashlib.blake2b(token.encode(), digest_size=4).hexdigest()}"
    before, seen = reported(fake), len(logged(priced))
    answer = httpx.post(f"{priced.http_url}/v1/messages", json=anthropic_args("usage by token"),
                        headers={"x-api-key": token}, timeout=30)  # fmt: skip
    assert answer.status_code == 200
    spent = spent_since(fake, before)
    with priced.client() as client:
        client.request("anthropic", "messages.create", **anthropic_args("usage, no caller named"))
        snapshot, stats = client.snapshot(), json.dumps(client.stats())
    scraped = scrape(priced.metrics_url)
    table = subprocess.run([ISOPOOL, "stats", "--url", priced.url], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "COLUMNS": "200"}).stdout  # fmt: skip
    assert list(snapshot.tokens_by_caller) == [name] and billed(snapshot.tokens_by_caller) == spent
    for kind in FIELDS:
        assert scraped[("isopool_caller_tokens_total", (("caller", name), ("type", kind)))] == spent[kind]
    row = next(line for line in table.splitlines() if name in line)
    assert f"{spent['input']:,}" in row and f"{spent['output']:,}" in row
    assert [line["caller"] for line in logged(priced)[seen:]] == [name, ""]
    assert not any(token in text for text in (stats, table, log.read_text(), repr(scraped)))


def test_a_price_table_remembers_the_latest_models_not_the_first_ones():
    """Found by the session-27 review: the lookup cache kept the first 4 096 models forever, so every model
    named after them paid the scan of all globs (60 ms with 20 000) at each usage report."""
    table = msgspec.convert({"models": {f"model-{i}-*": {"input": 1.0, "output": 2.0} for i in range(100)}},
                            PriceTable)  # fmt: skip
    cache: dict = {}
    for n in range(5000):
        table.price(f"caller-named-{n}", cache)
    assert len(cache) == 4096 and "caller-named-4999" in cache and "caller-named-0" not in cache
    assert table.price("model-7-latest", cache) is table.models["model-7-*"] and "model-7-latest" in cache
