"""A fault-injecting fake of the Anthropic and OpenAI HTTP APIs, for the demo, tests and benchmarks.

Imported lazily (PEP 562): the command line reads the fault kinds for its help without
loading aiohttp, which only the server and its process need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; ruff keeps it equal to __all__
    from .faults import FAULT_HEADER, KINDS, LATENCY_HEADER, FaultPlan, parse_fault
    from .process import FakeProviderProcess
    from .server import FakeProvider, Latency

__all__ = [
    "FAULT_HEADER",
    "KINDS",
    "LATENCY_HEADER",
    "FakeProvider",
    "FakeProviderProcess",
    "FaultPlan",
    "Latency",
    "parse_fault",
]


def __getattr__(name: str) -> Any:
    if name in ("FakeProvider", "Latency"):
        from . import server as home
    elif name == "FakeProviderProcess":
        from . import process as home
    elif name in __all__:
        from . import faults as home
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(home, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
