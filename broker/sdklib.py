"""Which HTTP library an installed SDK generation is built on.

anthropic 0.x and openai 1.x/2.x are built on `httpx`; anthropic 1.x/2.x and openai 3.x on `httpx2`.
An environment may hold one of each (anthropic 0.87 next to openai 3.x), so it is looked up per SDK:
the shim builds its transport on it (callers), a worker its headers and error checks (workers).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

LIBRARIES = ("httpx2", "httpx")


@functools.cache
def library(kind: str) -> ModuleType:
    """httpx or httpx2: whichever the SDK `kind`'s `_base_client` module imported (one of them, in every release)."""
    base = vars(importlib.import_module(f"{kind}._base_client"))
    for name in LIBRARIES:
        if isinstance(base.get(name), ModuleType):
            return base[name]
    raise ImportError(f"the installed {kind} SDK is built on neither httpx nor httpx2")
