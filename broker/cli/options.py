"""Command-line options that more than one `isopool` command takes."""

from __future__ import annotations

from collections.abc import Callable

import click


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
