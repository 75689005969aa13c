"""`isopool loadtest`: load tests of Anthropic- and OpenAI-compatible endpoints from the pool.

    from broker.loadtest import Options, run
    results = run(Options(concurrency=[64, 256], requests=2000), "out/")

Imported lazily, so that every `isopool` command does not pay for the SDKs this loads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Options", "rebuild", "run"]


def __getattr__(name: str) -> Any:
    if name == "Options":
        from .options import Options

        return Options
    if name == "run":
        from .runner import run

        return run
    if name == "rebuild":
        from .report import rebuild

        return rebuild
    raise AttributeError(name)
