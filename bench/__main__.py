"""isopool's benchmarks, each measured side by side with a baseline in the same run.

    python -m bench SCENARIO... [--quick] [--json FILE]  SCENARIO: of the list below, or all
    python -m bench report [--json FILE] [--out DIR]     Markdown table and PNG plots from the JSON

Every scenario runs against the fake provider on loopback, prints a table, and stores its
raw numbers under its name in the JSON file (other scenarios' entries are kept).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from .common import SIZES, verdict

SCENARIOS = (
    "overhead",
    "stream",
    "scale",
    "faults",
    "respawn",
    "memory",
    "loadgen",
    "onewrite",
    "rescue",
    "shim",
    "gateway",
    "startup",
)
NEEDS_RAY = ("cluster",)  # only by name: the `ray` extra is not in `bench`
DEFAULT_JSON = os.path.join(os.path.dirname(__file__), "results", "results.json")


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _save(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def show(console: Console, name: str, module: Any, data: dict[str, Any]) -> None:
    head, rows = module.table(data)
    table = Table(title=f"{name} ({data['seconds']} s)", title_justify="left")
    for column in head:
        table.add_column(column, justify="left" if column == head[0] else "right")
    for row in rows:
        table.add_row(*("–" if cell is None else str(cell) for cell in row))
    console.print(table)
    for t in data["targets"]:
        colour = "green" if t["met"] else "yellow" if t.get("bound") else "red"
        console.print(f"  target {t['name']}: {t['value']} (want {t['goal']}) [{colour}]{verdict(t)}[/]")
    for note in data.get("notes", []):
        console.print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", nargs="+", choices=[*SCENARIOS, *NEEDS_RAY, "all", "report"])
    parser.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="size",
        default="full",
        help="small sizes: every scenario in under two minutes",
    )
    parser.add_argument("--size", choices=SIZES, default="full", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--out", help="report: directory for report.md and the plots (default: next to the JSON)")
    args = parser.parse_args(argv)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
    if "report" in args.scenario:
        if len(args.scenario) > 1:
            parser.error("report runs alone: python -m bench report [--json FILE] [--out DIR]")
        from .report import write_report

        written = write_report(_load(args.json), args.out or os.path.dirname(os.path.abspath(args.json)))
        for path in written:
            print(path)
        return 0 if written else 1
    names = SCENARIOS if "all" in args.scenario else tuple(dict.fromkeys(args.scenario))
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        console.print(f"[bold]{name}[/]: {module.__doc__.splitlines()[0].split(': ', 1)[1]}")
        data = module.run(args.size)
        data["size"] = args.size
        stored = _load(args.json)
        stored[name] = data
        _save(args.json, stored)
        show(console, name, module, data)
    console.print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
