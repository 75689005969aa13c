"""A price table (setting `prices`): what a million tokens of each kind cost, by model glob, read from a
TOML file the operator keeps. isopool ships none: a shipped table would go stale without a word.

    date = "2026-01-15"        # optional: when these prices were read (shown with every cost)
    currency = "USD"           # optional, USD by default

    [models."claude-sonnet-4*"]
    input = 3.0                # per million input tokens (those not read from or written to the cache)
    output = 15.0
    cache_read = 0.30          # optional: input's price when not given
    cache_write = 3.75

The first glob that matches a model (in the file's order) prices it; a model that none matches has no
cost (its tokens are counted all the same).
"""

from __future__ import annotations

import fnmatch
import tomllib
from typing import Annotated

import msgspec

from .protocol import Tokens

_MODELS_KEPT = 4096  # models whose glob lookup is remembered, the latest (callers name models)


# A price per million tokens: finite and not negative (a negative cost reads as a counter reset in Prometheus,
# nan or inf would make a model's cost nan or inf for good); a million dollars a million tokens is past any model.
Amount = Annotated[float, msgspec.Meta(ge=0, le=1e6)]


class Price(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    input: Amount
    output: Amount
    cache_read: Amount | None = None
    cache_write: Amount | None = None

    def of(self, tokens: Tokens) -> float:
        """The cost of `tokens` (`input` counts the cached ones too), in the table's currency."""
        read = self.input if self.cache_read is None else self.cache_read
        write = self.input if self.cache_write is None else self.cache_write
        plain = max(0, tokens.input - tokens.cache_read - tokens.cache_write)
        return (plain * self.input + tokens.output * self.output + tokens.cache_read * read
                + tokens.cache_write * write) / 1e6  # fmt: skip


class PriceTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    models: dict[str, Price]
    date: str = ""
    currency: str = "USD"
    path: str = ""

    def price(self, model: str, cache: dict[str, Price | None]) -> Price | None:
        """The price of `model` (None: no glob matches), remembered in `cache`."""
        if model in cache:
            return cache[model]
        found = next((p for glob, p in self.models.items() if fnmatch.fnmatchcase(model, glob)), None)
        if len(cache) >= _MODELS_KEPT:  # the oldest goes: a model named since is looked up once, not at each report
            del cache[next(iter(cache))]
        cache[model] = found
        return found

    def label(self) -> str:
        """How a cost says where it came from: the file, its currency, and its date when it gives one."""
        return f"{self.path} ({self.currency}{', ' + self.date if self.date else ', undated'})"


def load(path: str) -> PriceTable:
    """The table at `path`; ValueError saying what to fix."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"setting prices: cannot read {path!r}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"setting prices: {path!r} is not TOML: {exc}") from None
    if "date" in raw:  # a TOML date (2026-01-15, unquoted) as it was written
        raw["date"] = str(raw["date"])
    try:
        return msgspec.convert({**raw, "path": path}, PriceTable)
    except msgspec.ValidationError as exc:
        raise ValueError(f"setting prices: {path!r}: {exc} (see the README's 'Usage and cost')") from None
