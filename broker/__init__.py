"""isopool: a process-isolation worker pool for Anthropic and OpenAI SDK calls.

The client side lives here: the embedded `Pool`, the low-level `Client`/`AsyncClient`,
configuration, and the exceptions callers see.
"""

from .client.client import AsyncCall, AsyncClient, Client, Result, StreamEvent, SyncCall
from .client.pool import Pool
from .config import ConfigError, Limits, Profile, Settings, load_settings
from .errors import (
    AttemptsExhausted,
    BadRequest,
    BrokerUnavailable,
    Cancelled,
    ClientClosed,
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
    StreamStalled,
    WorkerLost,
)

__all__ = [
    "AsyncCall",
    "AsyncClient",
    "AttemptsExhausted",
    "BadRequest",
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
    "StreamStalled",
    "SyncCall",
    "WorkerLost",
    "load_settings",
]
