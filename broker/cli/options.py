"""What more than one `isopool` command shares: options, and how Ctrl-C ends a long one."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import click


@contextlib.contextmanager
def interruptible(hint: str) -> Iterator[None]:
    """Ctrl-C ends the command saying `hint` (what was kept, how to go on) with exit status 130, in place of
    click's bare "Aborted!" and status 1."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: {hint}", err=True)
        sys.exit(130)


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
