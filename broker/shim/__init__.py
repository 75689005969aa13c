"""Drop-in SDK clients whose every call runs in a pool worker.

    from broker.shim import anthropic          # instead of `import anthropic`
    client = anthropic.Anthropic()              # same arguments, same results, same exceptions

The four client classes are subclasses of the SDKs' own, so `isinstance` checks pass.
Only their HTTP transport is replaced (see `transport`): the SDK still builds every
request and parses every answer here, so every method, helper and future endpoint
works, while the request itself is sent by a fresh worker process holding the pool's
key, which the broker kills and replaces if its stream stalls.

The pool is `pool=` (a `Pool` or a broker URL), else `$ISOPOOL_URL`, else an embedded
pool with the default profiles, started on first use and stopped at exit.
"""

from __future__ import annotations

import atexit
import os
import threading
import types
from typing import Any

import anthropic as _anthropic
import httpx2
import openai as _openai

from ..client.client import Client
from ..client.pool import Pool
from .errors import ANTHROPIC, OPENAI, SdkErrors
from .transport import STAND_IN_KEY, AsyncPoolTransport, PoolTransport

BASE_PATH = "/isopool"
SHIM_BASE_URL = "http://isopool.invalid" + BASE_PATH  # never contacted: the transport takes every request

# Each SDK's constructor arguments that give a client credentials of its own. With one of them, or
# with its own base_url (where the SDK then finds its key as it would without the pool), a client
# sends what its SDK put on each request; with none, the pool's key.
_CREDENTIALS = {
    "anthropic": ("api_key", "auth_token", "credentials", "config"),
    "openai": ("api_key", "admin_api_key", "workload_identity"),
}

_lock = threading.Lock()
_embedded: Pool | None = None
_clients: dict[tuple[str, float], Client] = {}


def pool_url(pool: Pool | str | None) -> str:
    """The broker a shim client talks to (starting the embedded pool if none is named)."""
    global _embedded
    if isinstance(pool, Pool):
        return pool.url
    if pool:
        return pool
    if os.environ.get("ISOPOOL_URL"):
        return os.environ["ISOPOOL_URL"]
    with _lock:
        if _embedded is None:
            _embedded = Pool(allow_overrides=True).start()  # owned by this process: its clients' keys are ours
            atexit.register(_embedded.stop)
        return _embedded.url


def _sync_client(url: str, broker_timeout: float) -> Client:
    """One pool connection per broker for all synchronous shim clients of this process."""
    with _lock:
        client = _clients.get((url, broker_timeout))
        if client is None:
            client = _clients[(url, broker_timeout)] = Client(url, broker_timeout)
        return client


def _options(
    kind: str, errors: SdkErrors, asynchronous: bool, pool: Any, profile: str | None, broker_timeout: float,
    kwargs: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The SDK constructor's arguments with the pool's transport in place of its HTTP client, and
    the SDK's retries handed to the pool: its client gets max_retries=0, and the caller's
    `max_retries` (the SDK's default 2) + 1 is each call's attempt budget in the pool."""
    base_url = kwargs.pop("base_url", None)
    http_client = kwargs.pop("http_client", None)
    retries = kwargs.pop("max_retries", None)
    if http_client is not None and str(base_url).rstrip("/") == SHIM_BASE_URL:  # the SDK's copy()/with_options()
        if retries:  # with_options(max_retries=N): a copy whose calls have N + 1 attempts
            http_client = type(http_client)(transport=http_client._transport.with_attempts(retries + 1))
        return {**kwargs, "base_url": base_url, "http_client": http_client, "max_retries": 0}
    if http_client is not None:
        raise ValueError("http_client belongs to the pool: its workers make the HTTP requests")
    url, profile, base_url = pool_url(pool), profile or kind, str(base_url or "")
    own = base_url or any(kwargs.get(name) is not None for name in _CREDENTIALS[kind])
    if own and not _sync_client(url, broker_timeout).stats().get("allow_overrides"):
        raise ValueError(
            f"the pool at {url} holds the provider keys and does not allow a client's own credentials or base_url "
            "(setting allow_overrides); drop them, or configure a provider profile and pass profile=NAME"
        )
    sdk = _anthropic if kind == "anthropic" else _openai
    attempts = (sdk.DEFAULT_MAX_RETRIES if retries is None else retries) + 1
    if asynchronous:
        transport: Any = AsyncPoolTransport(url, profile, BASE_PATH, errors, broker_timeout, base_url, attempts)
        client: Any = httpx2.AsyncClient(transport=transport)
    else:
        transport = PoolTransport(_sync_client(url, broker_timeout), profile, BASE_PATH, errors, base_url, attempts)
        client = httpx2.Client(transport=transport)
    if not own:  # the pool's key then (in the worker); the SDK wants one to build requests
        kwargs["api_key"] = STAND_IN_KEY
    return {**kwargs, "base_url": SHIM_BASE_URL, "http_client": client, "max_retries": 0}


class Anthropic(_anthropic.Anthropic):
    def __init__(self, *, pool: Pool | str | None = None, profile: str | None = None, broker_timeout: float = 10.0,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**_options("anthropic", ANTHROPIC, False, pool, profile, broker_timeout, kwargs))


class AsyncAnthropic(_anthropic.AsyncAnthropic):
    def __init__(self, *, pool: Pool | str | None = None, profile: str | None = None, broker_timeout: float = 10.0,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**_options("anthropic", ANTHROPIC, True, pool, profile, broker_timeout, kwargs))


class OpenAI(_openai.OpenAI):
    def __init__(self, *, pool: Pool | str | None = None, profile: str | None = None, broker_timeout: float = 10.0,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**_options("openai", OPENAI, False, pool, profile, broker_timeout, kwargs))


class AsyncOpenAI(_openai.AsyncOpenAI):
    def __init__(self, *, pool: Pool | str | None = None, profile: str | None = None, broker_timeout: float = 10.0,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**_options("openai", OPENAI, True, pool, profile, broker_timeout, kwargs))


def _namespace(sdk: types.ModuleType, sync: type, asynchronous: type) -> types.ModuleType:
    """The SDK module's public names, with its two client classes replaced by the pool's."""
    module = types.ModuleType(f"broker.shim.{sdk.__name__}", sdk.__doc__)
    module.__dict__.update({k: v for k, v in vars(sdk).items() if not k.startswith("_")})
    module.__dict__.update({sync.__name__: sync, asynchronous.__name__: asynchronous, "Client": sync,
                            "AsyncClient": asynchronous})  # fmt: skip
    return module


anthropic = _namespace(_anthropic, Anthropic, AsyncAnthropic)
openai = _namespace(_openai, OpenAI, AsyncOpenAI)


def install() -> None:
    """Put the pool's client classes into the real `anthropic` and `openai` modules, so that a
    script runs through the pool without a change (`isopool run`). Module-level clients such
    as `openai.chat.completions` are not covered: they are built from a private class."""
    for sdk, sync, asynchronous in ((_anthropic, Anthropic, AsyncAnthropic), (_openai, OpenAI, AsyncOpenAI)):
        for name, cls in ((sync.__name__, sync), (asynchronous.__name__, asynchronous)):
            setattr(sdk, name, cls)
        sdk.Client, sdk.AsyncClient = sync, asynchronous  # type: ignore[attr-defined]


__all__ = ["Anthropic", "AsyncAnthropic", "AsyncOpenAI", "OpenAI", "anthropic", "install", "openai", "pool_url"]
