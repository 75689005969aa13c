"""What more than one `isopool` command shares: options, and how Ctrl-C ends a long one."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

import click


@contextlib.contextmanager
def interruptible(hint: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C ends the command saying `hint()` (what was kept, how to go on, as it stands then), in place
    of click's bare "Aborted!"."""
    try:
        yield
    except KeyboardInterrupt:
        die_of_ctrl_c(hint())


def die_of_ctrl_c(said: str) -> NoReturn:
    """Say `said`, then end as killed by SIGINT, as Python does with an uncaught KeyboardInterrupt: a shell
    running the command in a loop or a script stops there (an exit status, even 130, lets it go on)."""
    click.echo(f"\ninterrupted{': ' if said else ''}{said}", err=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    sys.exit(130)  # were SIGINT blocked in this thread


def fault_rates_option(help: str) -> Callable:
    return click.option("--fault-rate", "fault_rates", multiple=True, metavar="SPEC=RATE", help=help)


def parse_rates(specs: tuple[str, ...]) -> dict[str, float]:
    """`SPEC=RATE` items (a SPEC may itself contain `=`) -> {spec: rate}."""
    rates: dict[str, float] = {}
    for item in specs:
        spec, sep, rate = item.rpartition("=")
        if not sep:
            raise click.BadParameter(f"expected SPEC=RATE, got {item!r}", param_hint="--fault-rate")
        try:
            rates[spec] = float(rate)
        except ValueError:
            raise click.BadParameter(f"rate {rate!r} is not a number", param_hint="--fault-rate") from None
    return rates
