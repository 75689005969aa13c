"""startup: what `isopool run` adds to a short script's life, next to the same script run directly:
launch to its first answer (the embedded pool boots while the script imports its SDK, and each
profile's workers start as soon as the zygote holds their SDK), and launch to the process's exit
(the pool stopped at exit). One script per SDK: anthropic's workers start first, openai's after.

Target: the first answer of an Anthropic script <= 1 s later than direct (issue 19: launch to the
first worker ready was 3.3-4.3 s here)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from broker.fake_provider import FakeProviderProcess

from .common import latency, ms, pick, result, target

SCRIPTS = {
    "anthropic": "import anthropic\nanthropic.Anthropic().messages.create(model='claude-bench', max_tokens=1, "
    "messages=[{'role': 'user', 'content': 'hi'}])",
    "openai": "import openai\nopenai.OpenAI().chat.completions.create(model='gpt-bench', max_tokens=1, "
    "messages=[{'role': 'user', 'content': 'hi'}])",
}
# Appended to each script: when its first answer came, counted from the launch the runner noted.
REPORT = "\nimport os, sys, time\nprint(time.time() - float(os.environ['BENCH_LAUNCHED']), file=sys.stderr)\n"


def launch(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds to the script's first answer, seconds to its exit), both from the launch."""
    env = {**env, "BENCH_LAUNCHED": repr(time.time())}
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    ended = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    return float(out.stderr.split()[-1]), ended


def run(size: str) -> dict[str, Any]:
    started = time.monotonic()
    repeat = pick(size, 10, 4, 1)
    isopool = str(Path(sys.executable).with_name("isopool"))
    figures: dict[str, Any] = {}
    with FakeProviderProcess() as fake, tempfile.TemporaryDirectory(prefix="bench-startup-") as folder:
        env = {**os.environ, "ANTHROPIC_BASE_URL": fake.url, "OPENAI_BASE_URL": fake.url + "/v1",
               "ANTHROPIC_API_KEY": "bench", "OPENAI_API_KEY": "bench"}  # fmt: skip
        env.pop("ISOPOOL_URL", None)
        for sdk in SCRIPTS:
            script = os.path.join(folder, f"{sdk}_script.py")
            Path(script).write_text(SCRIPTS[sdk] + REPORT)
            runs: dict[str, list[tuple[float, float]]] = {"direct": [], "run": []}
            for _ in range(repeat):  # in turn, so that drift in machine load hits both alike
                runs["direct"].append(launch([sys.executable, script], env))
                runs["run"].append(launch([isopool, "run", script], env))
            for way, times in runs.items():
                figures[f"{sdk}_{way}_answer"] = latency([t[0] for t in times])
                figures[f"{sdk}_{way}_exit"] = latency([t[1] for t in times])
            figures[f"{sdk}_added_ms"] = ms(
                statistics.median(t[0] for t in runs["run"]) - statistics.median(t[0] for t in runs["direct"])
            )
    added = figures["anthropic_added_ms"]
    targets = [
        target("isopool run adds to an Anthropic script's first answer (ms)", added, "<= 1000", lambda v: v <= 1000)
    ]
    return result({"repeat": repeat}, figures, targets, started)


def table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    f = data["figures"]
    rows = []
    for sdk in SCRIPTS:
        for way, label in (("direct", "python script.py"), ("run", "isopool run script.py")):
            answer, exit_ = f[f"{sdk}_{way}_answer"], f[f"{sdk}_{way}_exit"]
            rows.append([f"{sdk}: {label}", answer["median_ms"], answer["p99_ms"], exit_["median_ms"], answer["n"]])
    return ["script", "first answer, median ms", "p99 ms", "exit, median ms", "runs"], rows
