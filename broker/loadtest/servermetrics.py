"""What the target's own metrics said during a load point (`--server-metrics`): its series second
by second, aligned with the generator's by time from the point's start, and its figures over the
point's steady window, the same window the generator's throughput is counted in: the mean and
last value of each gauge, the rate of each counter (an increase that goes down is a restart, read
as Prometheus reads it), and for each histogram the mean (from its `_sum` and `_count`) and p50/p99
(from its buckets) of what it observed inside the window."""

from __future__ import annotations

import statistics
from typing import Any

from .promtext import Selection, quantile
from .scrape import Scraper, check, endpoint

_SHOWN = 12  # series shown in the console table; the CSV and results.json have them all


class ServerMetrics:
    """`--server-metrics` over a run: the endpoint checked before anything runs (the built-in fake's
    once it is up), then one `Scraper` per load point."""

    def __init__(self, spec: str, target: str, interval: float, series: str) -> None:
        self.spec, self.target, self.interval, self.series = spec, target, interval, series
        self.url = ""
        self.checked = Selection(series)  # the patterns the first scrape matched
        if not (spec == "target" and target == "fake"):  # a server we did not start: refused at once
            self.url = endpoint(spec, target)
            self.page = check(self.url, self.checked)

    @classmethod
    def of(cls, options: Any) -> ServerMetrics | None:
        """None without `--server-metrics`; raises EndpointError if its endpoint is no use."""
        if not options.server_metrics:
            return None
        return cls(options.server_metrics, options.target, options.server_metrics_interval,
                   options.server_metrics_series)  # fmt: skip

    def start(self, fake_url: str) -> str:
        """Ready to scrape; what to tell the user."""
        if not self.url:
            self.url = endpoint(self.spec, self.target, fake_url)
            self.page = check(self.url, self.checked)
        histograms = len(self.page.buckets)
        note = (f"scraping {self.url} every {self.interval:g} s: {len(self.page.kinds)} series, "
                f"{histograms} histogram{'' if histograms == 1 else 's'}")  # fmt: skip
        if self.checked.unmatched():
            note += "; nothing matches " + ", ".join(self.checked.unmatched()) + " yet"
        return note

    def scraper(self) -> Scraper:
        return Scraper(self.url, self.interval, Selection(self.series))


def point_metrics(scraper: Scraper, window: dict[str, Any]) -> dict[str, Any]:
    """The `server_metrics` of a point's results."""
    scrapes = list(scraper.scrapes)
    kinds: dict[str, str] = {}
    for s in scrapes:
        kinds |= s.page.kinds
    keys = sorted(kinds)
    inside = _inside(scrapes, window["begin"], window["end"])
    figures: dict[str, dict[str, float | None]] = {}
    for key in keys:
        values = [s.page.values.get(key) for s in inside]
        present = [v for v in values if v is not None]
        if kinds[key] == "gauge":
            figures[key] = {"mean": round(statistics.fmean(present), 6) if present else None,
                            "last": present[-1] if present else None}  # fmt: skip
        else:
            figures[key] = {"rate": _rate([s.t for s in inside], values)}
    return {
        "url": scraper.url,
        "interval": scraper.interval,
        "scrapes": len(scrapes),
        "failed": sum(scraper.failures.values()),
        "failures": dict(scraper.failures),
        "unmatched": scraper.select.unmatched(),
        "t": [s.t for s in scrapes],
        "kinds": kinds,
        "series": {key: [s.page.values.get(key) for s in scrapes] for key in keys},
        "window": figures,
        "histograms": _histograms(inside),
    }


def _inside(scrapes: list[Any], begin: float, end: float) -> list[Any]:
    """The scrapes inside the window; all of the point's when fewer than two fall inside it."""
    inside = [s for s in scrapes if begin <= s.t <= end]
    return inside if len(inside) >= 2 else scrapes


def _rate(times: list[float], values: list[float | None]) -> float | None:
    """A counter's increase per second between its first and last reading (a drop is a restart from 0)."""
    readings = [(t, v) for t, v in zip(times, values, strict=True) if v is not None]
    if len(readings) < 2 or readings[-1][0] <= readings[0][0]:
        return None
    increase = sum(b - a if b >= a else b for (_, a), (_, b) in zip(readings, readings[1:], strict=False))
    return round(increase / (readings[-1][0] - readings[0][0]), 6)


def _histograms(inside: list[Any]) -> dict[str, dict[str, float | None]]:
    """Per histogram: what it observed between the first and last scrape of the window."""
    if len(inside) < 2:
        return {}
    first, last = inside[0].page, inside[-1].page
    found: dict[str, dict[str, float | None]] = {}
    for key, buckets in last.buckets.items():
        before = first.buckets.get(key, {})
        grown = {bound: count - before.get(bound, 0.0) for bound, count in buckets.items()}
        if min(grown.values(), default=0.0) < 0:  # restarted inside the window: what it holds now
            grown = dict(buckets)
        count = grown.get(float("inf"), max(grown.values(), default=0.0))
        total = _delta(first.values, last.values, _part(key, "_sum"))
        found[key] = {"count": count, "mean": round(total / count, 6) if count and total is not None else None,
                      "p50": _round(quantile(0.5, grown)), "p99": _round(quantile(0.99, grown))}  # fmt: skip
    return found


def _part(key: str, suffix: str) -> str:
    """`name{labels}` -> `name_sum{labels}`."""
    name, brace, labels = key.partition("{")
    return name + suffix + brace + labels


def _delta(before: dict[str, float], after: dict[str, float], key: str) -> float | None:
    if key not in after:
        return None
    return after[key] - before.get(key, 0.0) if after[key] >= before.get(key, 0.0) else after[key]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def csv_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    """A point's CSV cells: `server:KEY:mean` and `:last` of gauges, `:rate` of counters (per second),
    `:mean`, `:p50` and `:p99` of histograms, over the steady window; scrapes and failures."""
    cells: dict[str, Any] = {"server:scrapes": metrics["scrapes"], "server:failed": metrics["failed"]}
    for key, figures in metrics["window"].items():
        cells |= {f"server:{key}:{name}": value for name, value in figures.items()}
    for key, figures in metrics["histograms"].items():
        cells |= {f"server:{key}:{name}": value for name, value in figures.items() if name != "count"}
    return cells


def describe(metrics: dict[str, Any]) -> str:
    """One line for the console: where, how many scrapes, how many failed and why."""
    line = f"server metrics from {metrics['url']}: {metrics['scrapes']} scrapes, {metrics['failed']} failed"
    if metrics["failures"]:
        line += " (" + ", ".join(f"{reason} ×{n}" for reason, n in metrics["failures"].items()) + ")"
    if metrics["unmatched"]:
        line += "; no series matched " + ", ".join(metrics["unmatched"])
    return line


def figures(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(series, its steady-window figure as text) for the console table, the first `_SHOWN`."""
    rows = [(key, _text(f)) for key, f in metrics["window"].items() if not key.endswith(("_sum", "_count"))]
    rows += [(key, f"mean {_num(f['mean'])}, p50 {_num(f['p50'])}, p99 {_num(f['p99'])}")
             for key, f in metrics["histograms"].items()]  # fmt: skip
    return rows[:_SHOWN]


def _text(f: dict[str, float | None]) -> str:
    if "rate" in f:
        return f"{_num(f['rate'])}/s"
    return f"mean {_num(f['mean'])}, last {_num(f['last'])}"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
