"""The `isopool` command line (`commands`), its shared `options`, its terminal output
(`render`) and the `demo` it runs.

`main` is imported lazily: `broker.loadtest` imports `options` and `render` from here and
`commands` imports `loadtest.cli`, so an eager import would be circular, and would load
every command for a table of `render`."""

from __future__ import annotations

from typing import Any

__all__ = ["main"]


def __getattr__(name: str) -> Any:
    if name == "main":
        from .commands import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
