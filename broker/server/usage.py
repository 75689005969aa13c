"""Token usage and its cost, by profile and model (the model that answered), by client connection and
by the caller a request named (a gateway's token, by name).

An attempt is billed exactly what its provider reported of it: its worker sends each change of the
answer's usage as it passes (Kind.USAGE, worker/usage.py), and the difference from the attempt's last
report is added here at once. So an attempt that streamed output and then stalled (its worker killed,
no end sent) is billed what the provider had reported, and one that failed before any event (a stall
before output, an HTTP error) reported nothing and is billed nothing. Costs come from the price table
(setting `prices`), per report, with the answering model's price.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..prices import Price, PriceTable
from ..protocol import MAX_TOKENS, Spent, Tokens
from .callers import who

# Callers name models (and connections come and go): past this many keys, the rest count as one.
MAX_KEYS = 1000


class _Tally:
    __slots__ = ("input", "output", "cache_read", "cache_write", "attempts", "cost")

    def __init__(self) -> None:
        self.input = self.output = self.cache_read = self.cache_write = self.attempts = 0
        self.cost = 0.0

    def add(self, delta: Tokens, new_attempt: bool) -> None:
        self.input += delta.input
        self.output += delta.output
        self.cache_read += delta.cache_read
        self.cache_write += delta.cache_write
        self.attempts += new_attempt
        self.cost += delta.cost or 0.0

    def tokens(self, priced: bool) -> Tokens:
        cost = round(self.cost, 6) if priced else None
        return Tokens(self.input, self.output, self.cache_read, self.cache_write, self.attempts, cost)


class Accounts:
    """The broker's token accounts; `spent` takes each USAGE a worker sends."""

    def __init__(self, prices: PriceTable | None = None) -> None:
        self.prices = prices
        self._priced: dict[str, Price | None] = {}
        self.by_model: dict[str, _Tally] = {}
        self.by_client: dict[str, _Tally] = {}
        self.by_caller: dict[str, _Tally] = {}

    def spent(self, req: Any, report: Spent) -> None:
        """Bill the difference between `report` and the attempt's previous one (`req.spent`)."""
        was, req.spent = req.spent, report
        delta = _difference(report, was)
        if delta is None:
            return
        price = self._price(answered(req))
        if price is not None:
            delta = msgspec.structs.replace(delta, cost=price.of(delta))
        first = was is None or not _billed(was)
        key = f"{req.profile}/{answered(req)}"
        _tally(self.by_model, key, f"{req.profile}/(other models)").add(delta, first)
        _tally(self.by_client, who(req.client), "(other clients)").add(delta, first)
        if req.submit.caller:
            _tally(self.by_caller, req.submit.caller, "(other callers)").add(delta, first)

    def attempt(self, req: Any) -> Tokens | None:
        """What the current attempt of `req` was billed (None: nothing), for the request log."""
        report = req.spent
        if report is None or not _billed(report):
            return None
        tokens = Tokens(*_counts(report), 1)
        price = self._price(answered(req))
        return tokens if price is None else msgspec.structs.replace(tokens, cost=round(price.of(tokens), 6))

    def _price(self, model: str) -> Price | None:
        return None if self.prices is None else self.prices.price(model, self._priced)

    def snapshot(self) -> dict[str, Any]:
        """The accounts' share of the broker's `Snapshot`, by field."""
        priced = self.prices is not None
        return {
            "tokens": {key: tally.tokens(priced) for key, tally in self.by_model.items()},
            "tokens_by_client": {key: tally.tokens(priced) for key, tally in self.by_client.items()},
            "prices": self.prices.label() if self.prices is not None else "",
            "tokens_by_caller": {key: tally.tokens(priced) for key, tally in self.by_caller.items()},
        }


def answered(req: Any) -> str:
    """The model that answered the current attempt: as the provider named it, else as it was asked."""
    report = req.spent
    return (report.response_model if report is not None else "") or req.model or req.submit.model


def total(attempts: list[Tokens | None]) -> Tokens | None:
    """A request's usage: the sum of its attempts' (None: none was billed)."""
    billed = [t for t in attempts if t is not None]
    if not billed:
        return None
    sums = [sum(getattr(t, f) for t in billed) for f in ("input", "output", "cache_read", "cache_write", "attempts")]
    costs = [t.cost for t in billed if t.cost is not None]
    return Tokens(*sums, cost=round(sum(costs), 6) if costs else None)


def _billed(report: Spent) -> bool:
    return bool(report.input_tokens or report.output_tokens or report.cache_read_tokens or report.cache_write_tokens)


def _difference(report: Spent, was: Spent | None) -> Tokens | None:
    """What `report` adds to `was` (counts are cumulative; one that went down adds nothing), or None."""
    before = (0, 0, 0, 0) if was is None else _counts(was)
    now = _counts(report)
    delta = [max(0, n - b) for n, b in zip(now, before, strict=True)]
    return Tokens(*delta) if any(delta) else None


def _counts(report: Spent) -> tuple[int, int, int, int]:
    """A report's four counts, each at most MAX_TOKENS (the worker's word, bounded like its own reading)."""
    counts = (report.input_tokens, report.output_tokens, report.cache_read_tokens, report.cache_write_tokens)
    return tuple(min(MAX_TOKENS, n) for n in counts)  # type: ignore[return-value]


def _tally(tallies: dict[str, _Tally], key: str, other: str) -> _Tally:
    if key not in tallies and len(tallies) >= MAX_KEYS:
        key = other
    tally = tallies.get(key)
    if tally is None:
        tally = tallies[key] = _Tally()
    return tally
