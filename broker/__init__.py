"""isopool: a process-isolation worker pool for Anthropic and OpenAI SDK calls.

The client side lives here: the embedded `Pool`, the low-level `Client`/`AsyncClient`,
configuration, and the exceptions callers see.

Imported lazily (PEP 562): a worker, the broker and the HTTP children import modules of
this package too, and load only those, not the client and the pool.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; ruff keeps it equal to __all__
    from .client.client import AsyncCall, AsyncClient, Client, Result, StreamEvent, SyncCall
    from .client.pool import Pool
    from .config import Limits, Profile, Settings, load_settings
    from .errors import (
        AttemptsExhausted,
        BadRequest,
        BrokerRefused,
        BrokerUnavailable,
        Cancelled,
        ClientClosed,
        ConfigError,
        DeadlineExceeded,
        IsopoolError,
        PoolSaturated,
        ProviderConnectionError,
        ProviderError,
        ProviderStatusError,
        ProviderStreamError,
        ProviderTimeoutError,
        RateLimited,
        RequestError,
        ShuttingDown,
        StreamIncomplete,
        StreamStalled,
        WorkerLost,
    )

__all__ = [
    "AsyncCall",
    "AsyncClient",
    "AttemptsExhausted",
    "BadRequest",
    "BrokerRefused",
    "BrokerUnavailable",
    "Cancelled",
    "Client",
    "ClientClosed",
    "ConfigError",
    "DeadlineExceeded",
    "IsopoolError",
    "Limits",
    "Pool",
    "PoolSaturated",
    "RateLimited",
    "Profile",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderStatusError",
    "ProviderStreamError",
    "ProviderTimeoutError",
    "RequestError",
    "Result",
    "Settings",
    "ShuttingDown",
    "StreamEvent",
    "StreamIncomplete",
    "StreamStalled",
    "SyncCall",
    "WorkerLost",
    "load_settings",
]

# The modules that define the public names, each importing those before it: looking them up
# in this order, a name loads no module that its own does not.
_HOMES = ("errors", "config", "client.client", "client.pool")


def __getattr__(name: str) -> Any:
    if name in __all__:
        for home in _HOMES:
            module = importlib.import_module(f".{home}", __name__)
            if hasattr(module, name):
                value = globals()[name] = getattr(module, name)  # the next lookup is a plain attribute
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
