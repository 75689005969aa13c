"""rescue: every fault of the fake provider through the gateway, the shim and the plain SDK.

One streaming call per fault through the gateway (a plain HTTP client, and the official SDK at
max_retries=0), the shim (SDK defaults) and the plain SDK straight at the provider (its defaults,
no pool); plus a provider down for 3 s then up.

The pool has `headers_timeout` 1 s, `first_event_timeout` 2 s, `stale_timeout` 1 s,
`max_attempts` 3, circuits open for 0.5 s (up to 1 s, so that a recovery shows within the 2 s
the outage row runs after its outage), and a `primary` profile whose fallback is the `backup`
profile's plain model, whose context fallback is a `-1m` model and whose broken streams are
continued (`continue_streams = ["prefill", "replay"]`, when this build has it), all on one fake
provider; faults ride in the model's name, so the fallback is served cleanly. Each column has a
pool of its own. A cell is the outcome, the attempts that reached the provider, the seconds, and
who answered when it was not the primary: *ok* only when the text equals the provider's
unfaulted answer for that body, and a stream that ended short but was taken as a success is
TRUNCATED.

Target: through the gateway and the shim every fault that has an answer is rescued within the
budget, a content filter and a replay that diverges are clean errors, and no truncated stream is taken
as a success."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from broker import Pool
from broker.fake_provider import FakeProviderProcess
from broker.fake_provider.server import Latency

from .common import pick, result, target
from .rescue_paths import ANTHROPIC, COLUMNS, OPENAI, POOLED, Answer, Api, caller, reference

LATENCY = Latency(ttft=0.05, gap=0.01, tokens=24)
SETTINGS = dict(http="127.0.0.1:0", headers_timeout=1.0, first_event_timeout=2.0, stale_timeout=1.0, max_attempts=3,
                circuit_cooldown=0.5, circuit_cooldown_max=1.0, log_level="ERROR")  # fmt: skip
CONTINUE = ["prefill", "replay"]
FAULTS = [
    "http-429:retry_after=1", "http-429", "http-500", "http-529", "unavailable:for=3", "no-headers",
    "stall-first", "stall-ping:after=6", "reset:after=6", "cut:after=6", "no-done", "no-done:open=true",
    "malformed:after=6",
    "error-event:after=0", "error-event:after=6", "context-length:limit=10", "content-filter",
]  # fmt: skip
TINY = ["http-500", "no-headers", "content-filter", "cut:after=6"]
NOPREFILL = ("cut:after=6 on a -noprefill model", "-noprefill@cut:after=6")  # Anthropic: only replay can continue it
# A cut stream whose every answer differs (`vary`): its replay diverges (Anthropic: a model that refuses prefill).
DIVERGES = ("replay diverges: cut:after=6,vary=true", "@cut:after=6,vary=true")
NO_ANSWER = ("content-filter", "replay diverges")  # nothing to rescue: a clean, truthful error is right
CLEAN_ERRORS = ("err", "refusal")
WRONG = ("TRUNCATED", "WRONG")
DOWN_FOR, DOWN_CALLS, DOWN_OVER = 3.0, 20, 5.0
DOWN = f"down {DOWN_FOR:g} s then up"
POOL_CAP = 30.0  # the pool bounds its calls far sooner (about 6 s here); this only keeps a broken build from hanging


def _pool(api: Api, provider: str) -> Pool:
    base = {"kind": api.kind, "base_url": api.base_url(provider), "min_workers": 1, "max_workers": 8}
    primary = {**base, "fallbacks": [{"profile": "backup", "model": api.model}],
               "context_fallback": {"model": api.model + "-1m"}, "continue_streams": CONTINUE}  # fmt: skip
    return Pool(profiles={"primary": primary, "backup": base}, **SETTINGS)


def _capped(call: Callable[[], Answer], cap: float) -> tuple[Answer | None, float, float]:
    """Run `call` on a thread; (its answer, or None if it still hangs after `cap` s; start; end). A
    hanging call is left to the fake provider's exit, which ends its connection."""
    box: list[Answer] = []

    def work() -> None:
        try:
            box.append(call())
        except Exception as exc:  # e.g. the gateway refused the connection: an error, not a hang
            box.append(Answer(error=type(exc).__name__))

    thread = threading.Thread(target=work, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(cap)
    return (box[0] if box else None), start, time.monotonic()


def _attempts(fake: FakeProviderProcess) -> int:
    return sum(len(times) for times in fake.stats()["arrivals"].values())


class Judge:
    """Compares an answer with the provider's unfaulted answer to the body its model was sent."""

    def __init__(self, api: Api, provider: str) -> None:
        self.api, self.provider = api, provider
        self.known: dict[tuple[str, str], str] = {}

    def outcome(self, answer: Answer | None, prompt: str, asked: str) -> str:
        if answer is None:
            return "hung"
        if answer.error:
            return "err"
        if answer.stop in ("refusal", "content_filter"):
            return "refusal"
        model = answer.model or asked
        if (prompt, model) not in self.known:
            self.known[prompt, model] = reference(self.api, self.provider, self.api.body(prompt, model))
        expected = self.known[prompt, model]
        return "ok" if answer.text == expected else "TRUNCATED" if expected.startswith(answer.text) else "WRONG"


def _rescued(pool: Pool | None) -> Counter[str]:
    """The pool's count of calls answered after a failure, by how (retry, fallback, prefill, replay...)."""
    if pool is None:
        return Counter()
    with pool.client() as client:
        return Counter(client.snapshot().rescued)


def _one(fake: FakeProviderProcess, pool: Pool | None, judge: Judge, call: Callable, prompt: str, model: str,
         cap: float) -> dict:  # fmt: skip
    fake.reset()
    before = _rescued(pool)
    answer, start, end = _capped(lambda: call(judge.api.body(prompt, model)), cap)
    attempts = _attempts(fake)
    return {
        "rescue": ",".join(sorted((_rescued(pool) - before).keys())),  # as the pool says
        "outcome": judge.outcome(answer, prompt, model),
        "attempts": attempts,
        "seconds": round(end - start, 2),
        "error": answer.error if answer else "",
        "profile": answer.profile if answer else "",
        "model": answer.model if answer else "",
    }


def _down(fake: FakeProviderProcess, judge: Judge, call: Callable, column: str, cap: float) -> dict:
    """DOWN_CALLS calls spread over DOWN_OVER s against a provider down DOWN_FOR s from the first."""
    fake.reset()
    model = f"{judge.api.model}@unavailable:for={DOWN_FOR:g}"
    calls: list[tuple[str, tuple[Answer | None, float, float]]] = []
    lock = threading.Lock()

    def one(prompt: str) -> None:
        outcome = _capped(lambda: call(judge.api.body(prompt, model)), cap)
        with lock:
            calls.append((prompt, outcome))

    threads, t0 = [], time.monotonic()
    for i in range(DOWN_CALLS):
        time.sleep(max(0.0, t0 + i * DOWN_OVER / DOWN_CALLS - time.monotonic()))
        threads.append(threading.Thread(target=one, args=(f"down {i} via {column}",), daemon=True))
        threads[-1].start()
    for thread in threads:
        thread.join()
    arrivals = fake.stats()["arrivals"]
    back = min(min(times) for times in arrivals.values()) + DOWN_FOR  # the fake's window opens at its first request
    outcomes: Counter[str] = Counter()
    answered_by: Counter[str] = Counter()
    recovered = []
    for prompt, (answer, start, end) in calls:
        outcome = judge.outcome(answer, prompt, model)
        outcomes[outcome] += 1
        if outcome == "ok":
            answered_by[answer.profile or "direct"] += 1  # type: ignore[union-attr]
            if answer.profile == "primary" and end > back:  # type: ignore[union-attr]
                recovered.append(max(0.0, start - back))
    return {
        "outcomes": dict(outcomes),
        "answered_by": dict(answered_by),
        "attempts": sum(len(times) for times in arrivals.values()),
        "back_on_primary_s": round(min(recovered), 2) if recovered else None,
    }


def _down_outcome(cell: dict) -> str:
    """The row's one outcome: ok when every call was answered right."""
    outcomes = cell["outcomes"]
    for worst in ("TRUNCATED", "WRONG", "hung"):
        if outcomes.get(worst):
            return worst
    return "ok" if outcomes.get("ok") == DOWN_CALLS else "err"


def _models(api: Api, faults: list[str], full: bool) -> list[tuple[str, str]]:
    """(row label, model name) of each fault row: the fault rides in the model's name."""
    models = [(spec, f"{api.model}@{spec}") for spec in faults]
    if api is ANTHROPIC and full:
        models.append((NOPREFILL[0], api.model + NOPREFILL[1]))
    if full:
        models.append((DIVERGES[0], api.model + ("-noprefill" if api is ANTHROPIC else "") + DIVERGES[1]))
    return models


def run_api(api: Api, fake: FakeProviderProcess, faults: list[str], full: bool, plain_cap: float) -> list[dict]:
    """Every row of one API (`full`: with the no-prefill and the outage rows). Each column has a pool
    of its own, so that one column's calls never find a circuit another column's calls opened."""
    judge = Judge(api, fake.url)
    models = _models(api, faults, full)
    cells: dict[str, dict[str, dict]] = {label: {} for label, _ in models} | ({DOWN: {}} if full else {})
    for column in COLUMNS:
        with _pool(api, fake.url) if column in POOLED else contextlib.nullcontext() as pool:
            call = caller(column, api, pool, fake.url)
            cap = POOL_CAP if pool is not None else plain_cap
            for label, model in models:
                cells[label][column] = _one(fake, pool, judge, call, f"{label} via {column}", model, cap)
            if full:
                cells[DOWN][column] = _down(fake, judge, call, column, cap)
                cells[DOWN][column]["outcome"] = _down_outcome(cells[DOWN][column])
    return [{"api": api.kind, "fault": label, "cells": row} for label, row in cells.items()]


def _pool_cells(rows: list[dict], fault: Callable[[str], bool] = lambda _: True) -> list[dict]:
    """The cells of the gateway's and the shim's columns, in rows whose fault passes `fault`."""
    return [row["cells"][name] for row in rows if fault(row["fault"]) for name in POOLED]


def _has_answer(fault: str) -> bool:
    return not fault.startswith(NO_ANSWER)


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    both = [ANTHROPIC, OPENAI]
    # the plain SDK's cap; at the tiny size 2.5 s: a cut stream of 0.11 s took over 1 s at load 8
    apis, faults, full, cap = pick(size, (both, FAULTS, True, 20.0), (both, FAULTS, True, 8.0),
                                   ([ANTHROPIC], TINY, False, 2.5))  # fmt: skip
    rows = []
    with FakeProviderProcess(LATENCY) as fake:
        for api in apis:
            rows += run_api(api, fake, faults, full, cap)
    summary = {name: dict(Counter(row["cells"][name]["outcome"] for row in rows)) for name in rows[0]["cells"]}
    budget = SETTINGS["max_attempts"]
    targets = [
        target("gateway and shim: faults with an answer not rescued",
               sum(c["outcome"] != "ok" for c in _pool_cells(rows, _has_answer)), "= 0", lambda v: v == 0),
        target("gateway and shim: content filter or divergent replay not a clean error",
               sum(c["outcome"] not in CLEAN_ERRORS for c in _pool_cells(rows, lambda f: not _has_answer(f))),
               "= 0", lambda v: v == 0),
        target("gateway and shim: truncated streams taken as success",
               sum(c["outcome"] in WRONG for c in _pool_cells(rows)), "= 0", lambda v: v == 0),
        target(f"gateway and shim: calls over the {budget}-attempt budget",
               sum(c["attempts"] > budget for c in _pool_cells(rows, lambda f: f != DOWN)), "= 0", lambda v: v == 0),
    ]  # fmt: skip
    inputs = {"apis": [api.kind for api in apis], "faults": faults, "cap_s": cap, "continue_streams": CONTINUE,
              "pool": {k: v for k, v in SETTINGS.items() if k not in ("http", "log_level")},
              "down": {"for_s": DOWN_FOR, "calls": DOWN_CALLS, "over_s": DOWN_OVER} if full else None,
              "latency": {"ttft_s": LATENCY.ttft, "gap_s": LATENCY.gap, "tokens": LATENCY.tokens}}  # fmt: skip
    data = result(inputs, {"rows": rows, "summary": summary}, targets, started)
    data["notes"] = _notes(inputs)
    return data


def _notes(inputs: dict[str, Any]) -> list[str]:
    notes = [
        f"stream continuation: continue_streams={inputs['continue_streams']} on the primary",
        "cell: outcome, attempts that reached the provider, seconds, who answered when not the primary, and "
        "prefill/replay when the pool continued a broken stream; "
        f"hung: the plain SDK still waiting after {inputs['cap_s']:g} s (then left)",
    ]
    if inputs["down"]:
        notes.append(f"{DOWN}: {DOWN_CALLS} calls over {DOWN_OVER:g} s; answered right / calls, by whom, attempts, "
                     "and how long after the outage ended calls were back on the primary (circuit_cooldown "
                     f"{SETTINGS['circuit_cooldown']:g} s, up to {SETTINGS['circuit_cooldown_max']:g} s)")  # fmt: skip
    return notes


def _cell(cell: dict) -> str:
    if "outcomes" in cell:  # the outage row
        ok = cell["outcomes"].get("ok", 0)
        by = " ".join(f"{n} {who}" for who, n in sorted(cell["answered_by"].items()))
        back = "" if cell["back_on_primary_s"] is None else f" back {cell['back_on_primary_s']:.1f}s"
        return f"{ok}/{DOWN_CALLS} ok ({by}) {cell['attempts']}a{back}"
    who = cell["profile"] if cell["profile"] not in ("", "primary") else ""
    if cell["model"].endswith("-1m"):
        who = cell["model"]
    how = cell["rescue"] if cell["rescue"] in CONTINUE else ""  # the others show in who answered
    words = [cell["outcome"], cell["error"], f"{cell['attempts']}a", f"{cell['seconds']:.1f}s", who, how]
    return " ".join(w for w in words if w)


def _tally(counts: dict[str, int]) -> str:
    clean, wrong = (sum(counts.get(k, 0) for k in kinds) for kinds in (CLEAN_ERRORS, WRONG))
    return f"{counts.get('ok', 0)} / {clean} / {wrong} / {counts.get('hung', 0)}"


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    names = list(data["figures"]["summary"])
    rows: list[list[Any]] = [[r["api"], r["fault"].replace(":", ": "), *(_cell(r["cells"][n]) for n in names)]
                             for r in data["figures"]["rows"]]  # fmt: skip
    rows.append(["", "ok / clean err / wrong / hung", *(_tally(data["figures"]["summary"][n]) for n in names)])
    return ["api", "fault", *names], rows
