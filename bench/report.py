"""The results file as Markdown tables (report.md) and PNG plots, for the README."""

from __future__ import annotations

import importlib
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .common import verdict  # noqa: E402


def _markdown(head: list[str], rows: list[list[Any]]) -> str:
    cells = [[("–" if c is None else str(c)).replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _targets(data: dict[str, Any]) -> str:
    return "\n".join(f"- {t['name']}: **{t['value']}** (target {t['goal']}): {verdict(t)}" for t in data["targets"])


def _save(fig: Any, out: str, name: str) -> str:
    path = os.path.join(out, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax: Any, labels: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend()


def plot_overhead(data: dict[str, Any], out: str) -> str:
    rows = data["figures"]["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [r["call"] for r in rows]
    _bars(ax, labels, {"direct SDK": [r["direct"]["median_ms"] for r in rows],
                       "through isopool": [r["pool"]["median_ms"] for r in rows]}, "median latency (ms)")  # fmt: skip
    ax.set_title("Tiny non-streaming request: direct vs through the pool")
    return _save(fig, out, "overhead")


def plot_stream(data: dict[str, Any], out: str) -> str:
    rows = data["figures"]["rows"]
    providers = sorted({r["provider"] for r in rows})
    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {p: [next(r["events_per_s"] for r in rows if r["provider"] == v and r["path"] == p) for v in providers]
              for p in paths}  # fmt: skip
    _bars(ax, providers, series, "events/s (one long stream)")
    ax.set_title("One 5,000-event stream")
    return _save(fig, out, "stream")


def _against_concurrency(ax: Any, rows: list[dict], lines: dict[str, str], ylabel: str, title: str) -> None:
    """One line per (label, field) of the rows, against concurrent streams on a log axis."""
    x = [r["concurrency"] for r in rows]
    for (label, key), style in zip(lines.items(), ("o-", "s--"), strict=False):
        ax.plot(x, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.set_title(title)


def plot_scale(data: dict[str, Any], out: str) -> str:
    rows = data["figures"]["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rates = {"through isopool": "pool_events_per_s", "direct async SDK": "direct_events_per_s"}
    _against_concurrency(left, rows, rates, "events/s", "Aggregate events/s")
    _against_concurrency(right, rows, {"idle": "uss_idle_mb", "under load": "uss_busy_mb"},
                         "USS of broker + zygote + workers (MB)", "Memory")  # fmt: skip
    return _save(fig, out, "scale")


def plot_faults(data: dict[str, Any], out: str) -> str:
    f = data["figures"]
    names = ["isopool, no faults", *f["contenders"]]
    runs = [f["clean_isopool"], *f["contenders"].values()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, [r["makespan_s"] or r["capped_at_s"] for r in runs],
             color=["C0" if r["makespan_s"] else "C3" for r in runs])  # fmt: skip
    left.set_ylabel("makespan (s); red: stopped at the cap")
    left.tick_params(axis="x", rotation=20)
    right.bar(names, [r["correct"] for r in runs], label="correct")
    right.bar(names, [r["hanging_at_cap"] for r in runs], bottom=[r["correct"] for r in runs], label="hanging at cap")
    right.set_ylabel("requests")
    right.tick_params(axis="x", rotation=20)
    right.legend()
    fig.suptitle(f"{data['inputs']['requests']} requests, concurrency {data['inputs']['concurrency']}, "
                 "5% stalls + 2% resets")  # fmt: skip
    return _save(fig, out, "faults")


def plot_memory(data: dict[str, Any], out: str) -> str:
    rows = data["figures"]["idle"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["workers"] for r in rows], [r["total_uss_mb"] for r in rows], "o-")
    ax.set_xlabel("idle workers")
    ax.set_ylabel("USS of broker + zygote + workers (MB)")
    ax.set_title("Idle memory")
    return _save(fig, out, "memory")


PLOTS = {"overhead": plot_overhead, "stream": plot_stream, "scale": plot_scale, "faults": plot_faults,
         "memory": plot_memory}  # fmt: skip


def write_report(results: dict[str, Any], out: str) -> list[str]:
    """Write report.md and one PNG per plotted scenario into `out`; returns the paths written."""
    os.makedirs(out, exist_ok=True)
    written, sections = [], []
    for name, data in results.items():
        module = importlib.import_module(f"bench.{name}")
        head, rows = module.table(data)
        section = [f"## {name}", "", module.__doc__.strip(), "",
                   f"`python -m bench {name}` ({data.get('size', 'full')} run, {data['seconds']} s, "
                   f"{data['machine']['cpus']} CPUs, {data['machine']['cpu_model']})", "",
                   _markdown(head, rows), "", _targets(data)]  # fmt: skip
        section += [f"- note: {note}" for note in data.get("notes", [])]
        if name in PLOTS:
            path = PLOTS[name](data, out)
            written.append(path)
            section += ["", f"![{name}]({os.path.basename(path)})"]
        sections.append("\n".join(section))
    if not sections:
        return []
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("# isopool benchmarks\n\nRegenerate: `python -m bench all && python -m bench report`.\n\n")
        f.write("\n\n".join(sections) + "\n")
    return [path, *written]
