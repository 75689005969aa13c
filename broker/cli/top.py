"""`isopool top`: a running broker, live. Each refresh is one stats snapshot over the broker's
frontend (the same request as `isopool stats`); rates are the difference between two snapshots.
On a terminal the screen is redrawn in place; piped or written to a file, each screen is printed
in turn (a log of screens). A broker that stops answering mid-view ends it with an error."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator

from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..client.client import Client
from ..errors import BrokerUnavailable
from ..protocol import Snapshot
from .render import broker_line, console, token_total, workers_table


def frame(s: Snapshot, before: Snapshot | None, seconds: float, live: bool = True) -> Group:
    """One screen: the broker, its rates since `before` (`seconds` earlier), workers, streams, recent events."""
    if before is not None and seconds > 0:
        answers = (
            sum(s.requests.values())
            - sum(before.requests.values())
            - (s.requests.get("accepted", 0) - before.requests.get("accepted", 0))
        )
        rates = f"{answers / seconds:.1f} answers/s, {(s.events - before.events) / seconds:.0f} events/s"
        rates += f", {(token_total(s) - token_total(before)) / seconds:.0f} tokens/s"
    else:
        rates = "rates from the next refresh"
    queued = ", ".join(f"{escape(p)} {n}" for p, n in sorted(s.queued.items())) or "none"
    summary = f"{s.in_flight} in flight, queued: {queued}; {rates}"
    tables = (workers_table(s), streams_table(s), recent_table(s))
    return Group(broker_line(s), summary, *tables, *(["[dim]q quits[/]"] if live else []))


def streams_table(s: Snapshot) -> Table:
    more = f" (the {len(s.streams)} oldest of {s.in_flight})" if s.in_flight > len(s.streams) else ""
    table = Table("request", "profile / model", "worker", "attempt", "age", "last event", "delivered",
                  title=f"streams in flight{more}")  # fmt: skip
    for r in s.streams:
        last = "none yet" if r.since_event is None else f"{r.since_event:.1f}s ago"
        table.add_row(str(r.request), escape(f"{r.profile} / {r.model}"), r.worker or "waiting", str(r.attempt),
                      f"{r.age:.1f}s", last, str(r.delivered))  # fmt: skip
    return table


def recent_table(s: Snapshot) -> Table:
    table = Table("ago", "what", "", title="recent kills, retries and fallbacks")
    for h in s.recent:
        table.add_row(f"{h.ago:.0f}s", h.what, escape(h.detail))
    return table


@contextlib.contextmanager
def keys() -> Iterator[Callable[[float], str]]:
    """`pressed(timeout)`: the key pressed within `timeout` seconds, or "". Without a terminal on
    stdin it only waits (Ctrl-C ends the view)."""
    if not os.isatty(sys.stdin.fileno()):
        yield lambda timeout: time.sleep(timeout) or ""
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield lambda timeout: os.read(fd, 1).decode(errors="replace") if select.select([fd], [], [], timeout)[0] else ""
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class BrokerWentAway(Exception):
    """The broker answered, then stopped answering while top was showing it."""


def top(url: str, interval: float, once: bool) -> None:
    """Show the broker at `url` until `q` (or Ctrl-C); with `once`, one screen and return."""
    with Client(url, broker_timeout=2.0) as client:
        snapshot, at = client.snapshot(), time.monotonic()
        if once:
            console.print(frame(snapshot, None, 0, live=False))
            return
        in_place = console.is_terminal  # rich's Live would show a pipe only its last screen, at the end
        live = Live(frame(snapshot, None, 0), console=console, auto_refresh=False) if in_place else None
        if live is None:
            console.print(frame(snapshot, None, 0, live=False))
        with keys() as pressed, live or contextlib.nullcontext():
            while pressed(interval).lower() != "q":
                now = time.monotonic()
                try:
                    before, snapshot = snapshot, client.snapshot()
                except BrokerUnavailable:
                    raise BrokerWentAway(f"the broker at {url} stopped answering (it went away, or hangs)") from None
                screen = frame(snapshot, before, now - at, live=in_place)
                if live is not None:
                    live.update(screen, refresh=True)
                else:
                    console.print(screen)
                at = now
