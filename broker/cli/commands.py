"""The `isopool` command line: serve, stats, keygen, batch, ray-cluster, run, demo, fake-provider and loadtest."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import Any

import click
import msgspec

from ..errors import ConfigError
from ..fake_provider.faults import KINDS
from ..loadtest.cli import loadtest
from .options import die_of_ctrl_c, fault_rates_option, interruptible, parse_rates


class _Commands(click.Group):
    """A setting that cannot be used (from the file, an ISOPOOL_ variable, or a profile whose kind needs an
    extra) ends any command with its message, not a traceback, wherever its pool is made; a Ctrl-C that
    the command does not handle itself ends it as killed by SIGINT."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            die_of_ctrl_c("")


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """isopool: a process-isolation worker pool for Anthropic and OpenAI SDK calls.

    Stalled streams are detected (even while keep-alive pings arrive), their worker
    process is killed and replaced, and the request is retried if the caller has not
    seen any of it yet."""


_FAKE_HELP = """Run the fault-injecting fake Anthropic/OpenAI provider in the foreground.

Per request, a fault is chosen by the `x-isopool-fault` header or by a model name
ending in `@SPEC` (SPEC is `kind[:key=value,...]`, e.g. `stall-ping:after=3`);
latency by the `x-isopool-latency` header (`ttft=0.1,gap=0.01,tokens=50,knee=4,slope=0.5`).

An Anthropic conversation that ends with an assistant turn (a prefill) is continued from it: the
answer is the rest of the one the conversation without that turn gets. A model whose name ends in
`-noprefill` (e.g. `claude-fake-noprefill`) refuses a prefill with Anthropic's real 400.
A header or model fault fires `times` times (default 1) per conversation (the body without a
trailing assistant turn: a prefilled continuation is not cut again); with `vary=true` the answer
changes each time the conversation is served, as a sampling model's does (a replay diverges).

\b
Fault kinds:
""" + "\n".join(f"  {k:15} {v}" for k, v in KINDS.items())


@main.command("fake-provider", help=_FAKE_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback only makes sense).")
@click.option("--port", default=8765, show_default=True, help="Port to bind; 0 picks a free one.")
@click.option("--ttft", default=0.0, show_default=True, help="Seconds before the first event.")
@click.option("--gap", default=0.0, show_default=True, help="Seconds between events.")
@click.option("--tokens", default=16, show_default=True, help="Output tokens per answer.")
@click.option(
    "--batched",
    is_flag=True,
    help="Write an unpaced answer in one write (real servers, and the default, write each event alone).",
)
@fault_rates_option("Inject a fault into this share of requests, e.g. 'stall-ping:after=3=0.05'. Repeatable.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fault draws.")
@click.option(
    "--prefix-cache",
    is_flag=True,
    help="Remember prompt prefixes and report cached input tokens in usage, as a server with prefix caching does.",
)
@click.option("--owned", is_flag=True, hidden=True, help="Exit when stdin closes (child of another process).")
@click.option(
    "--load-knee", default=0, show_default=True, help="Answers in progress before the server slows (see --load-slope)."
)
@click.option(
    "--load-slope",
    default=0.0,
    show_default=True,
    help="Per answer in progress beyond --load-knee, ttft and gap each grow by this share of their value "
    "(0: no slowdown).",
)
def fake_provider(
    host, port, ttft, gap, tokens, batched, fault_rates, seed, prefix_cache, owned, load_knee, load_slope
) -> None:
    from ..fake_provider.process import serve
    from ..fake_provider.server import Latency

    try:
        latency = Latency(ttft, gap, tokens, batched, load_knee, load_slope)
        asyncio.run(serve(host, port, latency, parse_rates(fault_rates), seed, owned, prefix_cache))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:  # the port taken, or not ours to bind
        from ..endpoints import bind_failure

        raise click.ClickException(f"cannot listen on {host}:{port}: {bind_failure(exc)}") from None


def _unavailable(url: str, exc: Exception) -> click.ClickException:
    """No broker answered, or one refused this client's CURVE keys (which the message then names)."""
    from ..errors import BrokerRefused

    if isinstance(exc, BrokerRefused):
        return click.ClickException(str(exc))
    return click.ClickException(f"no broker answered at {url}; start one with `isopool serve`")


def _default_url() -> str:
    from ..endpoints import ipc_url, shared_run_dir

    return os.environ.get("ISOPOOL_URL") or ipc_url(shared_run_dir(), "frontend")


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="TOML configuration file.")
@click.option("--frontend", help="Endpoint for clients, e.g. ipc:///run/isopool/frontend.sock or tcp://127.0.0.1:5555.")
@click.option(
    "--http",
    metavar="HOST:PORT",
    help="Also serve Anthropic/OpenAI-compatible HTTP endpoints here (any program with a base_url can use the pool).",
)
@click.option(
    "--metrics",
    metavar="HOST:PORT",
    help="Also serve Prometheus metrics here (GET /metrics; names in the README).",
)
@click.option(
    "--token",
    metavar="auto|FILE",
    help="The gateway's own token: 'auto' makes one and prints it at start; else a file holding it "
    "(never the token itself, which `ps` would show). Needed off loopback.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow a tcp:// frontend without CURVE keys: anyone who reaches the port can spend the provider keys.",
)
def serve(
    config_path: str | None,
    frontend: str | None,
    http: str | None,
    metrics: str | None,
    token: str | None,
    insecure: bool,
) -> None:
    """Run a broker with its zygote and workers in the foreground.

    Clients connect with ISOPOOL_URL (printed at start). Ctrl-C or SIGTERM drains:
    no new requests, in-flight ones finish within drain_timeout, then everything stops.

    A tcp:// frontend requires CURVE keys (settings curve_server_key and curve_clients_dir;
    see `isopool keygen`), or --insecure.

    The pool retries a provider's 429 and 5xx, lost connections and a silence before the
    response headers (headers_timeout, once) for every caller, within each call's
    max_attempts and deadline (settings headers_timeout, retry_after_max, http_retry_backoff)."""
    from ..config import load_settings
    from ..endpoints import RunDirTaken, shared_run_dir
    from ..processes import ChildFailed
    from ..server.serve import run_broker

    overrides: dict[str, object] = {
        k: v for k, v in (("frontend", frontend), ("http", http), ("metrics", metrics)) if v
    }
    if insecure:
        overrides["insecure"] = True
    if token:
        overrides["gateway_token" if token == "auto" else "gateway_token_file"] = token
    try:
        settings = load_settings(config_path, **overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if not settings.run_dir:
        settings = msgspec.structs.replace(settings, run_dir=shared_run_dir())
    try:
        run_broker(settings)
    except (OSError, RunDirTaken, ChildFailed) as exc:  # ChildFailed: its gateway or metrics endpoint
        raise click.ClickException(f"cannot start the broker: {exc}") from None


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="broker", show_default=True, help="Files: NAME.key and NAME.key_secret.")
def keygen(directory: str, name: str) -> None:
    """Make a CURVE key pair for a tcp:// broker or one of its clients.

    \b
    The broker:   isopool keygen keys --name broker
                  curve_server_key = "keys/broker.key_secret", curve_clients_dir = "allowed/"
    A client:     isopool keygen keys --name alice; copy keys/alice.key into allowed/
                  ISOPOOL_CLIENT_KEY=keys/alice.key_secret ISOPOOL_BROKER_KEY=keys/broker.key
    Hand out only the .key files; the .key_secret files (0600) stay with their owner."""
    from ..endpoints import UnsafeRunDir
    from ..wire.curve import keygen as make_keys

    try:
        public, secret = make_keys(directory, name)
    except (ConfigError, UnsafeRunDir) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"public key: {public}\nsecret key: {secret} (keep it private)")


@main.command()
@click.option("--url", default=None, help="Broker frontend (default: $ISOPOOL_URL, else the local `isopool serve`).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw stats as JSON.")
def stats(url: str | None, as_json: bool) -> None:
    """Show a running broker's workers, counters and latencies."""
    from ..client.client import Client
    from ..errors import BrokerUnavailable

    url = url or _default_url()
    with Client(url, broker_timeout=1.0) as client:
        try:
            snapshot = client.snapshot()
        except BrokerUnavailable as exc:
            raise _unavailable(url, exc) from None
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(snapshot), indent=2))
        return
    from .render import print_stats

    print_stats(snapshot)


@main.command()
@click.option("--url", default=None, help="Broker frontend (default: $ISOPOOL_URL, else the local `isopool serve`).")
@click.option("-n", "--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one screen and exit (for scripts and logs).")
def top(url: str | None, interval: float, once: bool) -> None:
    """Watch a running broker live: workers, the streams in flight with their age and last
    event, queues, recent kills, retries and fallbacks, answers and events per second. q quits.
    Piped or redirected, it prints each screen in turn."""
    from ..errors import BrokerUnavailable
    from .top import BrokerWentAway
    from .top import top as show

    url = url or _default_url()
    try:
        show(url, max(0.1, interval), once)
    except BrokerUnavailable as exc:
        raise _unavailable(url, exc) from None
    except BrokerWentAway as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("input_path", metavar="IN.jsonl", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Results file (appended, resumable)."
)
@click.option("--format", "fmt", type=click.Choice(["openai", "anthropic"]), help="Input format (default: detected).")
@click.option("--job", metavar="MODULE:FUNCTION", help="Call this agent function per line instead (see above).")
@click.option("--pool", "pool_url", help="Broker URL (default: $ISOPOOL_URL, else an embedded pool for this run).")
@click.option(
    "-c", "--concurrency", type=int, help="Requests in flight at once (default: what the pool's workers carry)."
)
@click.option("--retry-budget", default=5, show_default=True, help="Times a throttled (429/529) request is re-sent.")
@click.option("--rpm", default=0, help="At most this many requests per minute (0: no ceiling).")
@click.option("--tpm", default=0, help="At most this many estimated tokens (input + max output) per minute.")
@click.option(
    "--skip-invalid", is_flag=True, help="Write invalid lines as errored results instead of refusing to start."
)
@click.option(
    "--rerun-changed", is_flag=True,
    help="Run again the ids done in OUT whose request (or --job line) in IN changed (default: refuse to start).",
)  # fmt: skip
@click.option("--allow-failures", is_flag=True, help="Exit 0 even if some requests failed.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option(
    "--ray", "ray_address", metavar="auto|ADDRESS",
    help="Run on a Ray cluster, one pool per node ('auto': $RAY_ADDRESS or the one started on this machine).",
)  # fmt: skip
@click.option("--per-node-concurrency", type=click.IntRange(min=1), help="With --ray: requests in flight on each node.")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="With --ray: each node serves Prometheus metrics on this port (0: any).",
)
def batch(input_path, output, fmt, job, pool_url, concurrency, retry_budget, rpm, tpm, skip_invalid, rerun_changed,
          allow_failures, as_json, ray_address, per_node_concurrency, metrics_port):  # fmt: skip
    """Run a provider batch file through the pool: every custom_id answered exactly once.

    IN.jsonl holds OpenAI Batch input lines ({"custom_id", "method", "url", "body"}) or
    Anthropic Message Batches requests ({"custom_id", "params"}); results are written in
    the matching provider's batch result format. Re-running the same command after a
    crash resumes: ids already in the output are skipped, a torn last line is repaired.
    One run writes an output at a time (a second is refused); OUT.manifest records which
    request each result answers, and an input that reuses a done id for a different request
    is refused (--rerun-changed runs those ids again). If a result cannot be written (a full
    disk), no more lines are sent: free space and run the same command again.
    A 429/529 that outlasts the pool's retries halves the concurrency (which grows
    back as answers come), pauses for its retry-after, and is re-sent up to --retry-budget.

    With --job, FUNCTION(line, ctx) is called once per line (in a thread, or on an event
    loop if it is a coroutine function); ctx.anthropic and ctx.openai are SDK clients whose
    every call goes through the pool. Its return value or exception is the line's result.

    With --ray, one pool runs on every node of a Ray cluster (needs `pip install
    'isopool[ray]'` here and on the nodes); this process deals the lines to the nodes and
    alone writes the output. A lost node's unanswered lines run again on the others, and
    the summary counts them (each may have been paid twice).

    Exits 1 if any line failed (unless --allow-failures), 2 if the input is invalid or the
    output refused (another run writes it, it is damaged, or it answers a different input),
    3 if a result could not be written."""
    import msgspec

    from ..batch import (
        BatchInputError,
        BatchOutputError,
        OutputWriteFailed,
        RayOptions,
        RayUnavailable,
        load_job,
        run,
        run_job,
    )
    from .render import BatchProgress, print_batch

    if not ray_address and (per_node_concurrency or metrics_port is not None):
        raise click.UsageError("--per-node-concurrency and --metrics-port go with --ray")
    if ray_address and (job or pool_url or concurrency or rpm or tpm):
        raise click.UsageError("--ray runs its own pool on each node: --job, --pool, -c, --rpm and --tpm do not apply")
    try:
        function = load_job(job) if job else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--job") from None
    ray = RayOptions(ray_address, per_node_concurrency, metrics_port) if ray_address else None
    # Ray prints its cluster notices (such as a node marked dead) on stdout: keep stdout for the summary
    notices_to_stderr = contextlib.redirect_stdout(sys.stderr) if ray else contextlib.nullcontext()
    try:
        with interruptible(lambda: _kept(output)), notices_to_stderr, BatchProgress(enabled=not as_json) as progress:
            callbacks = dict(on_result=progress.result, on_start=progress.start)
            if function is not None:
                summary = run_job(input_path, output, function, pool=pool_url, concurrency=concurrency or 16,
                                  rerun_changed=rerun_changed, on_interrupt=_waiting, **callbacks)  # fmt: skip
            else:
                summary = run(input_path, output, pool=pool_url, fmt=fmt, concurrency=concurrency,
                              retry_budget=retry_budget, rpm=rpm, tpm=tpm, skip_invalid=skip_invalid,
                              rerun_changed=rerun_changed, on_status=progress.status, ray=ray,
                              **callbacks)  # fmt: skip
    except (BatchInputError, BatchOutputError) as exc:
        click.echo(str(exc), err=True)
        sys.exit(3 if isinstance(exc, OutputWriteFailed) else 2)
    except RayUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    data = msgspec.to_builtins(summary)
    if as_json:
        click.echo(json.dumps(data))
    else:
        print_batch(data, output)
    if summary.failed and not allow_failures:
        sys.exit(1)


def _waiting(running: int) -> None:
    click.echo(f"\nCtrl-C: waiting for the {running} jobs running to end, to write their results "
               "(Ctrl-C again to leave them unwritten)", err=True)  # fmt: skip


def _kept(output: str) -> str:
    """What an interrupted batch leaves, and how to go on."""
    if os.path.isfile(output) and os.path.getsize(output):
        return f"the results written so far stay in {output}; run the same command again to send the rest"
    return f"no result was written to {output} yet; run the same command again to start"


@main.command("ray-cluster")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(min=1), help="Ray nodes to start.")
@click.option("--cpus", default=1, show_default=True, type=click.IntRange(min=1), help="CPUs each node offers Ray.")
def ray_cluster(nodes: int, cpus: int) -> None:
    """Run a Ray cluster of several nodes on this machine until Ctrl-C, to try `batch --ray` or `loadtest --ray`.

    Each node has its own raylet, so `isopool batch --ray` (or `loadtest --ray`) puts a pool on
    each, as on a real cluster. Ctrl-C or SIGTERM stops every process it started (by pid)."""
    import signal
    import time

    from ..batch import RayUnavailable
    from ..batch.cluster import require_ray

    try:
        require_ray()
    except RayUnavailable as exc:
        raise click.ClickException(str(exc).replace("--ray needs", "ray-cluster needs")) from None
    from ..batch.localcluster import LocalCluster

    click.echo(f"starting {nodes} Ray node(s)...", err=True)
    with LocalCluster(nodes, cpus) as cluster:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        click.echo(f"Ray cluster of {nodes} node(s) at {cluster.address}; in another terminal:\n"
                   f"  isopool batch IN.jsonl -o OUT.jsonl --ray {cluster.address}\n"
                   f"  isopool loadtest --ray {cluster.address}\n"
                   "Ctrl-C stops it.")  # fmt: skip
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            click.echo("stopping the Ray nodes...", err=True)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--pool", "pool_url", help="Broker URL (default: $ISOPOOL_URL, else an embedded pool for this run).")
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(pool_url: str | None, script: str, args: tuple[str, ...]) -> None:
    """Run an existing Anthropic/OpenAI Python script unchanged through a pool.

    Every `anthropic.Anthropic`, `AsyncAnthropic`, `openai.OpenAI` and `AsyncOpenAI`
    the script makes is the pool's drop-in client: its calls run in worker processes
    that are killed and replaced when a stream stalls. ARGS are passed to the script."""
    import runpy
    import traceback

    from ..shim import boot_embedded, install

    if pool_url:
        os.environ["ISOPOOL_URL"] = pool_url
    elif not os.environ.get("ISOPOOL_URL"):
        boot_embedded()
    install()
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except KeyboardInterrupt:  # as Python shows the script's own: its traceback, then its atexit handlers run
        traceback.print_exc()
        sys.exit(130)


@main.command()
@click.option("-n", "--requests", default=300, show_default=True, help="How many requests to send.")
@click.option("-c", "--concurrency", default=24, show_default=True, help="How many in flight at once.")
@click.option("--stall-rate", default=0.06, show_default=True, help="Share of requests whose stream stalls.")
@click.option("--reset-rate", default=0.02, show_default=True, help="Share whose connection is reset mid-stream.")
@click.option("--error-rate", default=0.02, show_default=True, help="Share answered with HTTP 429/500 first.")
@click.option(
    "--stale-timeout", default=1.0, show_default=True, help="Seconds without a real event that count as a stall."
)
@click.option("--seed", default=7, show_default=True, help="Seed of the fault draws.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def demo(requests, concurrency, stall_rate, reset_rate, error_rate, stale_timeout, seed, as_json) -> None:
    """Watch the pool recover from injected stalls and faults, with nothing lost.

    Starts a fake Anthropic/OpenAI provider that stalls (pings and keep-alives
    included), resets and errors on a share of requests, a pool against it, and
    pushes requests of both providers, streaming and not, through it. Exits 1 if any
    request was lost or answered wrongly."""
    from .demo import run_demo
    from .render import demo_progress, print_demo

    if not (0 <= stall_rate + reset_rate + error_rate <= 1):
        raise click.BadParameter("the fault rates must add up to at most 1")
    with demo_progress(requests, enabled=not as_json) as progress:
        summary = run_demo(requests, concurrency, stall_rate, reset_rate, error_rate, stale_timeout, seed, progress)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        print_demo(summary)
    if summary["lost"] or summary["wrong"]:
        sys.exit(1)


main.add_command(loadtest)
