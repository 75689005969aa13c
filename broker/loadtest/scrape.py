"""Scraping the target's Prometheus endpoint during a load point, from a thread of its own.

The thread fetches and parses while the generator's event loop runs on: a scrape waits on
the socket with the GIL released, and parsing takes a few milliseconds of CPU a scrape (6 ms
at best, 10 ms typical on this busy 2-core machine, for a 40 KB page shaped like vLLM's: 426
lines, 13 histograms), which the interpreter hands back to the loop every 5 ms (its switch
interval). A scrape that fails or outlasts its timeout (the interval, at most 5 s) is
counted with its reason and the next one goes out on time; the run never waits for the
endpoint, and a point's end does not wait for a scrape in flight (the thread drops its
answer and ends within the timeout). A proxy set in the environment (and its no_proxy) is
used as the pool's workers use it for the target (`worker/timing.py`).
"""

from __future__ import annotations

import math
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import NamedTuple

from .promtext import Page, Selection, parse

_CHECK_TIMEOUT = 5.0
_MAX_PAGE = 16 * 2**20  # bytes; vLLM's page is ~40 KB
MIN_INTERVAL = 0.1  # seconds between scrapes: each costs the generator ~10 ms of CPU


class EndpointError(ValueError):
    """The metrics endpoint did not answer, or not with Prometheus text: refused before the run."""


class PageTooLarge(ValueError):
    """More than _MAX_PAGE bytes: a scrape failure, never read whole into memory."""


class Scrape(NamedTuple):
    t: float  # seconds from the point's start, halfway between asking and having the answer
    page: Page


def validate(spec: str, target: str, interval: float, series: str) -> None:
    """The --server-metrics options make sense together (ValueError saying what to do)."""
    if spec and spec != "target" and not spec.startswith(("http://", "https://")):
        raise ValueError(f"--server-metrics takes a Prometheus endpoint's URL (http://HOST:PORT/metrics) or "
                         f"`target` (the target's own /metrics), not {spec!r}")  # fmt: skip
    if spec == "target" and target in ("anthropic", "openai"):
        raise ValueError(f"{target} serves no metrics of its own: give --server-metrics a URL or leave it out")
    if not (math.isfinite(interval) and interval >= MIN_INTERVAL):
        raise ValueError(f"--server-metrics-interval must be at least {MIN_INTERVAL:g} seconds (each scrape costs "
                         "the generator CPU on the machine it measures)")  # fmt: skip
    if series and not spec:
        raise ValueError("--server-metrics-series chooses series of --server-metrics: give that too")


def endpoint(spec: str, target: str, fake_url: str = "") -> str:
    """The URL to scrape: `spec` itself, or for `target` the target's own /metrics (its base URL
    without /v1, as vLLM, SGLang and TGI serve it; the built-in fake's once it runs)."""
    if spec != "target":
        return spec
    base = fake_url if target == "fake" else target.rstrip("/").removesuffix("/v1")
    return base + "/metrics"


def fetch(url: str, select: Selection, timeout: float) -> Page:
    """One page, read within `timeout` in all (a socket's own timeout is per read, so a page sent a byte
    at a time would never end) and at most _MAX_PAGE bytes."""
    deadline = time.monotonic() + timeout
    body = bytearray()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        while chunk := response.read1(65536):
            body += chunk
            if len(body) > _MAX_PAGE:
                raise PageTooLarge(f"the page is larger than {_MAX_PAGE // 2**20} MiB")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page took more than {timeout:g}s")
    return parse(body.decode("utf-8", errors="replace"), select)


def check(url: str, select: Selection) -> Page:
    """One scrape now; EndpointError with what to do if it fails."""
    try:
        page = fetch(url, select, _CHECK_TIMEOUT)
    except (OSError, urllib.error.URLError) as exc:  # refused, unreachable, timed out, HTTP 4xx/5xx
        raise EndpointError(
            f"--server-metrics {url} did not answer ({_reason(exc)}): give the address of the server's "
            "Prometheus endpoint (vLLM, SGLang and TGI serve it at /metrics), or leave --server-metrics out"
        ) from None
    except PageTooLarge as exc:
        raise EndpointError(f"--server-metrics {url} answered, but {exc}: is it the /metrics address?") from None
    except ValueError as exc:
        raise EndpointError(
            f"--server-metrics {url} answered, but not with Prometheus text ({str(exc)[:80]}): give the "
            "server's /metrics address"
        ) from None
    if not page.families:
        raise EndpointError(f"--server-metrics {url} answered with no metrics at all: is it the /metrics address?")
    return page


class Scraper:
    """Scrapes `url` every `interval` seconds from a daemon thread, between `with` and its end."""

    def __init__(self, url: str, interval: float, select: Selection) -> None:
        self.url, self.interval, self.select = url, interval, select
        self.timeout = min(interval, _CHECK_TIMEOUT)
        self.scrapes: list[Scrape] = []
        self.failures: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._origin = 0.0

    def __enter__(self) -> Scraper:
        self._origin = time.monotonic()
        threading.Thread(target=self._loop, name="server-metrics", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._stop.set()

    def _loop(self) -> None:
        slot = 0
        while not self._stop.wait(max(0.0, self._origin + slot * self.interval - time.monotonic())):
            asked = time.monotonic()
            try:
                page, failure = fetch(self.url, self.select, self.timeout), ""
            except (OSError, ValueError) as exc:  # URLError is an OSError
                page, failure = None, _reason(exc)
            answered = time.monotonic()
            with self._lock:
                if self._stop.is_set():  # the point ended while this scrape was out
                    return
                if page is None:
                    self.failures[failure] += 1
                else:
                    self.scrapes.append(Scrape(round((asked + answered) / 2 - self._origin, 3), page))
            slot = max(slot + 1, int((answered - self._origin) / self.interval) + 1)  # skip the slots it missed


def _reason(exc: BaseException) -> str:
    """A short, stable reason to count failures by."""
    if isinstance(exc, PageTooLarge):
        return "page too large"
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, TimeoutError | ConnectionError):
        return {TimeoutError: "timed out", ConnectionRefusedError: "connection refused"}.get(
            type(cause), type(cause).__name__
        )
    if isinstance(exc, ValueError):
        return "not Prometheus text"
    return str(cause)[:60] or type(cause).__name__
