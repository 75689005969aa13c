"""The `isopool` command line: serve, stats, demo and fake-provider."""

from __future__ import annotations

import asyncio

import click

from .fake_provider.faults import KINDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """isopool: a process-isolation worker pool for Anthropic and OpenAI SDK calls.

    Stalled streams are detected (even while keep-alive pings arrive), their worker
    process is killed and replaced, and the request is retried if the caller has not
    seen any of it yet."""


def _rates(specs: tuple[str, ...]) -> dict[str, float]:
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


_FAKE_HELP = """Run the fault-injecting fake Anthropic/OpenAI provider in the foreground.

Per request, a fault is chosen by the `x-isopool-fault` header or by a model name
ending in `@SPEC` (SPEC is `kind[:key=value,...]`, e.g. `stall-ping:after=3`);
latency by the `x-isopool-latency` header (`ttft=0.1,gap=0.01,tokens=50`).

\b
Fault kinds:
""" + "\n".join(f"  {k:14} {v}" for k, v in KINDS.items())


@main.command("fake-provider", help=_FAKE_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback only makes sense).")
@click.option("--port", default=8765, show_default=True, help="Port to bind; 0 picks a free one.")
@click.option("--ttft", default=0.0, show_default=True, help="Seconds before the first event.")
@click.option("--gap", default=0.0, show_default=True, help="Seconds between events.")
@click.option("--tokens", default=16, show_default=True, help="Output tokens per answer.")
@click.option(
    "--fault-rate",
    "fault_rates",
    multiple=True,
    metavar="SPEC=RATE",
    help="Inject a fault into this share of requests, e.g. 'stall-ping:after=3=0.05'. Repeatable.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the fault draws.")
@click.option("--owned", is_flag=True, hidden=True, help="Exit when stdin closes (child of another process).")
def fake_provider(host, port, ttft, gap, tokens, fault_rates, seed, owned) -> None:
    from .fake_provider.process import serve
    from .fake_provider.server import Latency

    try:
        asyncio.run(serve(host, port, Latency(ttft, gap, tokens), _rates(fault_rates), seed, owned))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

