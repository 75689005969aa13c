"""The provider SDKs, each imported only by a process whose profiles use it.

Importing `anthropic` takes ~0.95 s and `openai` ~0.33 s (2 cores, warm disk): a pool of
one kind must not wait for the other's. The zygote loads the kinds its broker's profiles
name; a worker loads its own profile's kind (already there when it was forked).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import msgspec

from broker.sdklib import library

KINDS = ("anthropic", "openai")  # a profile's `kind`: the SDK's own package name

# What each SDK imports on a first call rather than at its own import: loaded with it.
_SUBMODULES = {
    "anthropic": ("anthropic._resource",),
    "openai": ("openai._resource", "openai.lib.streaming.chat"),
}
_CLIENT = {"anthropic": "AsyncAnthropic", "openai": "AsyncOpenAI"}
_BASE_ERROR = {"anthropic": "AnthropicError", "openai": "OpenAIError"}


class Sdk(msgspec.Struct, frozen=True):
    """One SDK's package, its async client class, its resource base class, its error base class and the
    HTTP library its generation is built on (httpx or httpx2)."""

    module: ModuleType
    client: type
    resource_type: type
    error: type
    http: ModuleType


def load(kind: str) -> Sdk:
    """Import the SDK of `kind` (a no-op once it is loaded)."""
    module = importlib.import_module(kind)
    for name in _SUBMODULES[kind]:
        importlib.import_module(name)
    resource = sys.modules[f"{kind}._resource"].AsyncAPIResource
    return Sdk(module, getattr(module, _CLIENT[kind]), resource, getattr(module, _BASE_ERROR[kind]), library(kind))


def loaded() -> list[ModuleType]:
    """The SDK packages this process has imported: only their exceptions can reach a worker's handlers."""
    return [sys.modules[kind] for kind in KINDS if kind in sys.modules]


def errors(name: str = "") -> tuple[Any, ...]:
    """Class `name` (e.g. `APIStatusError`; by default the base error) of every loaded SDK, for `isinstance`."""
    return tuple(getattr(module, name or _BASE_ERROR[module.__name__]) for module in loaded())


def http_errors(name: str) -> tuple[type, ...]:
    """Class `name` (e.g. `TimeoutException`) of the HTTP library of every loaded SDK, for `isinstance`."""
    return tuple({getattr(library(module.__name__), name) for module in loaded()})
