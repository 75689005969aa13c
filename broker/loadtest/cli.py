"""`isopool loadtest` and `isopool loadtest report`."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys

import click

from ..cli.options import fault_rates_option, interruptible, parse_rates


def _numbers(kind: type, text: str | None) -> list:
    if not text:
        return []
    try:
        return [kind(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


_HELP = """Load-test an Anthropic- or OpenAI-compatible endpoint from the process pool.

Every request is timed in its worker when the bytes arrive; a stream that stalls
(even while the server sends keep-alives) is cut at --stale-timeout and counted as a
stall, so the run always finishes. With no --target, the built-in fake provider is the
target, so a first run needs no key and no network.

\b
  isopool loadtest                                    # fake provider, 8 streams, 100 requests
  isopool loadtest -c 16,64,256 --duration 30 --warmup 5
  isopool loadtest --rate 5,10,20 --max-concurrency 64 --requests 500
  isopool loadtest --target http://localhost:8000/v1 --model my-model -c 32
  isopool loadtest --target http://localhost:8000/v1 -c 32 --server-metrics target   # + vLLM's /metrics
  isopool loadtest --trace mooncake_trace.jsonl --speedup 4 --target http://localhost:8000/v1
  isopool loadtest -c 16 --prefix-tokens 2048 --prefix-groups 4     # prompts that share prefixes
  isopool loadtest --target https://gateway.example/v1 --api-key-env GATEWAY_KEY
  isopool loadtest --find-max --slo ttft=500ms,tpot=50ms --duration 20 --warmup 5
  isopool loadtest --ray auto -c 96 --duration 30     # a generator on every Ray node
  isopool loadtest report loadtest-20261125-120000    # a finished or killed run
  isopool loadtest compare RUN-A RUN-B                # point by point, B against A

Results: OUT/records.jsonl (one line per request, written as each ends),
OUT/results.json (options, machine, per load point: summary, generator, series),
OUT/results.csv (one row per load point), and PNG plots (latency.png, series.png,
sweep.png for a sweep, search.png for --find-max; with the `plots` extra)."""


@click.group(invoke_without_command=True, help=_HELP)
@click.option(
    "--target",
    default="fake",
    show_default=True,
    help="fake, anthropic, openai (keys from the usual variables), or an OpenAI-compatible base URL (sent "
    "no key unless --api-key-env).",
)
@click.option(
    "--api-key-env",
    default="",
    metavar="NAME",
    help="Send the key in $NAME to the target; for anthropic and openai, instead of their usual variable.",
)
@click.option(
    "--api",
    type=click.Choice(["messages", "chat", "responses"]),
    help="Which API to call (default: messages for anthropic, else chat).",
)
@click.option("--model", default="", help="Model name (default: one per API).")
@click.option("-c", "--concurrency", help="Closed loop: requests in flight at once; a comma list sweeps.")
@click.option("--rate", help="Open loop: requests per second; a comma list sweeps.")
@click.option("--max-concurrency", default=0, help="Cap on requests in flight under --rate (0: none).")
@click.option(
    "--arrival",
    type=click.Choice(["poisson", "constant"]),
    default="poisson",
    show_default=True,
    help="Inter-arrival times under --rate.",
)
@click.option("-n", "--requests", default=0, help="Requests per load point (default 100 unless --duration).")
@click.option("--duration", default=0.0, help="Seconds per load point.")
@click.option("--warmup", default=0.0, help="Seconds at the start of each point recorded but left out of the figures.")
@click.option("--ramp-up", default=0.0, help="Seconds over which the load rises to its level.")
@click.option("--input-tokens", default="256", show_default=True, help="N, or mean=N,sd=S,min=A,max=B.")
@click.option("--output-tokens", default="128", show_default=True, help="N, or mean=N,sd=S,min=A,max=B.")
@click.option(
    "--turns",
    default=1,
    show_default=True,
    help="Synthetic conversations of this many turns, each carrying the ones before (under --rate, "
    "arrivals are conversations).",
)
@click.option(
    "--dataset",
    type=click.Path(exists=True, dir_okay=False),
    help="Send these requests (JSONL in the `isopool batch` formats) instead of synthetic prompts.",
)
@click.option(
    "--trace",
    type=click.Path(exists=True, dir_okay=False),
    help="Replay this trace at its own times, open loop: Mooncake JSONL (timestamp, input_length, output_length, "
    "hash_ids), or requests in the `isopool batch` formats with a timestamp (ms).",
)
@click.option("--speedup", default=1.0, show_default=True, help="Divide the trace's times by this.")
@click.option("--prefix-tokens", default=0, help="Synthetic prompts open with a shared prefix this many tokens long.")
@click.option("--prefix-groups", default=1, show_default=True, help="How many shared prefixes (one drawn per prompt).")
@click.option("--no-stream", is_flag=True, help="Ask for plain (non-streaming) answers.")
@click.option(
    "--sdk",
    is_flag=True,
    help="Time events as the official SDK hands them over, parsed, in this process (what applications "
    "pay), instead of where the bytes arrive in the workers.",
)
@click.option(
    "--streams-per-worker",
    default=0,
    help="Streams each worker process carries (default: spread over one worker per core; 1 with --sdk).",
)
@click.option("--stale-timeout", default=10.0, show_default=True, help="Seconds without output before a stall is cut.")
@click.option("--first-event-timeout", default=60.0, show_default=True, help="Seconds to the first event.")
@click.option("--slo", default="", help="Goodput limits, e.g. ttft=500ms,tpot=50ms,e2e=20.")
@click.option("--seed", default=0, show_default=True, help="Seed of prompts, lengths and arrivals.")
@click.option("--fake-ttft", default=0.05, show_default=True, help="The fake provider's time to first token (s).")
@click.option("--fake-gap", default=0.005, show_default=True, help="The fake provider's time between tokens (s).")
@fault_rates_option("Make the fake provider inject this fault into a share of requests, e.g. silent:after=5=0.1.")
@click.option(
    "--calibrate/--no-calibrate",
    default=True,
    show_default=True,
    help="First measure the generator's own ceiling against the built-in fake (a few seconds).",
)
@click.option(
    "--find-max",
    type=click.Choice(["rate", "concurrency"]),
    is_flag=False,
    flag_value="rate",
    help="Search for the highest rate (the default; open loop; with --trace, the speedup it is replayed at) or "
    "concurrency whose goodput meets --goodput "
    "under --slo (required), instead of listing loads: from --start, doubling until a probe fails or --max, then "
    "bisecting to --precision. Each probe is a point of --duration or --requests (with --warmup).",
)
@click.option("--goodput", type=float, help="With --find-max: the share of requests that must meet the SLO [0.95].")
@click.option("--start", type=float, help="With --find-max: the first load probed [1 req/s, or 1 stream].")
@click.option("--max", "limit", type=float, help="With --find-max: the highest load probed [none; 256 streams].")
@click.option("--precision", type=float, help="With --find-max: stop when the bracket is this close, relatively [0.1].")
@click.option("--max-probes", type=int, help="With --find-max: the most probes to run [12].")
@click.option("--fake-load-knee", default=0, help="The fake provider slows beyond this many answers in progress ...")
@click.option(
    "--fake-load-slope",
    default=0.0,
    help="... its ttft and gap each growing by this share per answer beyond the knee, as a real server's batch "
    "does (0: it never slows).",
)
@click.option("-o", "--out", default="", help="Output directory (default: loadtest-DATE-TIME).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the table.")
@click.option(
    "--server-metrics",
    default="",
    metavar="URL",
    help="Scrape the target's Prometheus endpoint during each point (vLLM, SGLang, TGI: http://HOST:PORT/metrics; "
    "`target`: the target's own /metrics, the built-in fake's too).",
)
@click.option("--server-metrics-interval", default=1.0, show_default=True, help="Seconds between two scrapes.")
@click.option(
    "--server-metrics-series",
    default="",
    metavar="NAMES",
    help="Series to keep, comma-separated names or glob patterns, e.g. 'vllm:num_requests_*,vllm:*tokens_total' "
    "(default: every counter and gauge; histograms as their _sum, _count and window quantiles).",
)
@click.option(
    "--ray",
    default="",
    metavar="auto|ADDRESS",
    help="Run a generator pool on every node of a Ray cluster, the load split among them ('auto': "
    "$RAY_ADDRESS or the one started on this machine; needs pip install 'isopool[ray]').",
)
@click.option(
    "--cloud",
    type=click.Choice(["bedrock", "vertex", "azure"]),
    help="Through a profile of this cloud kind, whose workers sign each request: against the fake's cloud "
    "routes, or --target URL (the cloud's endpoint); credentials and places from the workers' environment.",
)
@click.pass_context
def loadtest(ctx: click.Context, concurrency, rate, fault_rates, out, as_json, no_stream, find_max, goodput, start,
             limit, precision, max_probes, **options) -> None:  # fmt: skip
    if ctx.invoked_subcommand is not None:
        return
    from ..batch.cluster import RayUnavailable, require_ray
    from .options import Options
    from .report import LoadProgress
    from .runner import run
    from .search import Search

    steering = {"goodput": goodput, "start": start, "limit": limit, "precision": precision, "max_probes": max_probes}
    steering = {name: value for name, value in steering.items() if value is not None}
    try:
        if steering and not find_max:
            named = ", ".join("--" + {"limit": "max"}.get(name, name).replace("_", "-") for name in steering)
            raise ValueError(f"{named} steer the search of --find-max: give --find-max too")
        if find_max == "rate" and options["trace"]:  # a trace's rate is how fast it is replayed
            find_max = "speedup"
        search = Search(over=find_max, **steering) if find_max else None
        options |= {
            name: options[name] or "" for name in ("api", "dataset", "trace", "cloud")
        }  # as --ray's nodes read them
        opts = Options(concurrency=_numbers(int, concurrency), rate=_numbers(float, rate), stream=not no_stream,
                       fake_faults=parse_rates(fault_rates), find_max=search, **options)  # fmt: skip
        opts.workload()  # a dataset or trace is read (and checked) before anything starts
        if opts.ray:
            require_ray()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except RayUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    from .scrape import EndpointError

    out = out or datetime.datetime.now().strftime("loadtest-%Y%m%d-%H%M%S")
    if earlier := [name for name in ("records.jsonl", "results.json") if os.path.exists(os.path.join(out, name))]:
        raise click.UsageError(f"{out} holds an earlier run ({', '.join(earlier)}), which this one would overwrite: "
                               "give another --out, or remove them")  # fmt: skip
    # Ray prints its cluster notices (such as a node marked dead) on stdout: keep stdout for the results
    notices_to_stderr = contextlib.redirect_stdout(sys.stderr) if opts.ray and as_json else contextlib.nullcontext()
    try:
        with interruptible(lambda: _kept(out)), notices_to_stderr, LoadProgress(enabled=not as_json) as progress:
            results = run(opts, out, progress)
    except EndpointError as exc:  # checked before anything runs
        raise click.UsageError(str(exc)) from None
    except RayUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    _show(results, out, as_json)


def _kept(out: str) -> str:
    """What an interrupted load test leaves, and how to read it."""
    records = os.path.join(out, "records.jsonl")
    if os.path.isfile(records) and os.path.getsize(records):
        return f"what ran is in {records}; `isopool loadtest report {out}` summarizes it"
    return "no request had ended: nothing to report"


@loadtest.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the table.")
def report(directory: str, as_json: bool) -> None:
    """Summarize a load test's records (a finished run, or one killed half-way)."""
    from .report import DamagedRun, rebuild

    try:
        results = rebuild(directory)
    except DamagedRun as exc:
        raise click.ClickException(str(exc)) from None
    if not results["points"]:
        raise click.ClickException(f"no request records in {directory} yet")
    _show(results, directory, as_json)


@loadtest.command()
@click.argument("directories", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=".", show_default=True, help="Where to write compare-latency.png and "
              "compare-throughput.png.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of the table.")
def compare(directories: tuple[str, ...], out: str, as_json: bool) -> None:
    """Compare load tests point by point (finished runs, or killed ones): each later run against the first."""
    from . import plots
    from .compare import CompareError, print_comparison, write_plots
    from .compare import compare as compare_runs

    try:
        comparison = compare_runs(list(directories))
    except CompareError as exc:
        raise click.UsageError(str(exc)) from None
    written = write_plots(comparison, out) if plots.available() else []
    if as_json:
        json.dump(comparison, sys.stdout, indent=1)
        print()
        return
    print_comparison(comparison)
    click.echo("plots: " + ", ".join(written) if written else f"no plots: matplotlib is missing ({plots.INSTALL})")


def _show(results: dict, out: str, as_json: bool) -> None:
    """Write the CSV and plots next to the records; print the table, or the results as JSON."""
    from .report import print_results, save_outputs

    save_outputs(results, out, quiet=as_json)
    if as_json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print_results(results, out)
