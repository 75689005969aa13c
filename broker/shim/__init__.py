"""Drop-in SDK clients whose every call runs in a pool worker.

    from broker.shim import anthropic          # instead of `import anthropic`
    client = anthropic.Anthropic()              # same arguments, same results, same exceptions

The client classes (and the cloud ones: `AnthropicBedrock`, `AnthropicVertex`, `AnthropicFoundry`,
`AzureOpenAI` and their async twins, whose requests the workers sign, see `clouds`) are subclasses of the installed
SDKs' own, so `isinstance` checks pass;
each is built on first use, on the HTTP library its SDK's generation uses (`broker.sdklib`), so
only the SDK a caller uses is imported, and anthropic 0.40+ / openai 1.40+ (httpx) work as the
current generation (httpx2) does.
Only their HTTP transport is replaced (see `transport`): the SDK still builds every
request and parses every answer here, so every method, helper and future endpoint
works, while the request itself is sent by a fresh worker process holding the pool's
key, which the broker kills and replaces if its stream stalls.

The pool is `pool=` (a `Pool` or a broker URL), else `$ISOPOOL_URL`, else an embedded
pool with the default profiles (and a dormant one of each installed cloud kind, see `clouds`),
started on first use and stopped at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import threading
import types
import warnings
from typing import Any

from ..client.client import Client
from ..client.pool import Pool
from ..config import DEFAULT_BASE_URLS, load_settings
from ..extras import missing
from ..sdklib import library
from . import clouds, httplib
from .errors import SdkErrors
from .transport import STAND_IN_KEY, transports

BASE_PATH = "/isopool"
SHIM_BASE_URL = "http://isopool.invalid" + BASE_PATH  # never contacted: the transport takes every request

# Each SDK's client classes; its cloud classes (AnthropicBedrock, AnthropicVertex, AzureOpenAI and their
# async twins) are in shim/clouds.py.
_CLASSES = {"anthropic": ("Anthropic", "AsyncAnthropic"), "openai": ("OpenAI", "AsyncOpenAI")}
# Each SDK's constructor arguments, in any generation, that give a client credentials of its own
# (those the installed SDK accepts count). With one of them, or with its own base_url (where the SDK
# then finds its key as it would without the pool), a client sends what its SDK put on each request;
# with none, the pool's key.
_CREDENTIALS = {
    "anthropic": ("api_key", "auth_token", "credentials", "config", "profile"),  # profile: a credentials file
    "openai": ("api_key", "admin_api_key", "workload_identity"),
}
_OWN_CONNECTION = ("transport", "proxies", "connection_pool_limits")
# The max_retries given to a shim client's copy()/with_options() being made (None: none given).
_GIVEN_RETRIES: contextvars.ContextVar[int | None] = contextvars.ContextVar("isopool_given_retries", default=None)

_lock = threading.Lock()
_embedded: Pool | None = None
_clients: dict[tuple[str, float], Client] = {}


def pool_url(pool: Pool | str | None) -> str:
    """The broker a shim client talks to (starting the embedded pool if none is named)."""
    global _embedded
    if isinstance(pool, Pool):
        return pool.url
    if not _names_embedded(pool):
        return pool or os.environ["ISOPOOL_URL"]
    with _lock:
        if _embedded is None:
            # owned by this process, so its clients' keys are ours; calls queue in its broker while its
            # workers start, each profile's as soon as its SDK is imported
            _embedded = Pool(clouds.embedded_settings(load_settings(allow_overrides=True))).start(wait=False)
            atexit.register(_embedded.stop)
        return _embedded.url


def boot_embedded() -> None:
    """Start the embedded pool in the background (`isopool run`), so that it boots while the script
    imports its SDK. A client made before it is ready waits for it; one that failed to start is tried
    again by the first client, which raises its error."""

    def boot() -> None:
        with contextlib.suppress(Exception):
            pool_url(None)

    threading.Thread(target=boot, name="isopool-embedded-boot", daemon=True).start()


def _names_embedded(pool: Pool | str | None) -> bool:
    """Whether a client of `pool` uses the embedded pool: it names none, nor does $ISOPOOL_URL."""
    return not pool and not os.environ.get("ISOPOOL_URL")


def _allows_overrides(url: str, broker_timeout: float) -> bool:
    return bool(_sync_client(url, broker_timeout).stats().get("allow_overrides"))


def _sync_client(url: str, broker_timeout: float) -> Client:
    """One pool connection per broker for all synchronous shim clients of this process (looked up on each
    request: a forked child makes its own, its parent's loop thread not being there)."""
    client = _clients.get((url, broker_timeout))
    if client is None:
        with _lock:
            client = _clients.get((url, broker_timeout))
            if client is None:
                client = _clients[(url, broker_timeout)] = Client(url, broker_timeout)
    return client


def _forget_after_fork() -> None:
    """In a forked child: the parent's pool connections are unusable (their loop threads stayed in the
    parent) and its lock may have been held by another thread; both start afresh."""
    global _lock
    _lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


class _Sdk:
    """One installed SDK: its HTTP library, error classes, and the pool's two client classes and namespace."""

    def __init__(self, kind: str) -> None:
        self.kind, self.module = kind, importlib.import_module(kind)
        self.lib = library(kind)
        self.errors = SdkErrors(self.module, self.lib)
        self.transports = transports(self.lib)
        sync, asynchronous = _CLASSES[kind]
        self.accepted = inspect.signature(getattr(self.module, sync).__init__).parameters
        self.credentials = tuple(name for name in _CREDENTIALS[kind] if name in self.accepted)
        self.classes = {sync: self._subclass(sync, False), asynchronous: self._subclass(asynchronous, True)}
        self.classes |= {name: self._subclass(name, name.startswith("Async"), cloud)
                         for name, cloud in clouds.CLASSES[kind].items() if hasattr(self.module, name)}  # fmt: skip
        found, routed = self._clients(), sorted(self.classes)
        self.unrouted = {name: _unrouted(original, routed) for name, original in found.items()
                         if not name.startswith("_") and name not in (*routed, "Client", "AsyncClient")}  # fmt: skip
        # openai's module-level client (`openai.chat...`, no client object): `_ModuleClient`, `_AzureModuleClient`
        self.module_clients = {name: _unrouted(original, routed, _MODULE_CLIENT.format(kind=kind))
                               for name, original in found.items()
                               if name.startswith("_") and name.endswith("ModuleClient")}  # fmt: skip
        self.namespace = types.ModuleType(f"broker.shim.{kind}", self.module.__doc__)
        self.namespace.__dict__.update({k: v for k, v in vars(self.module).items() if not k.startswith("_")})
        self.namespace.__dict__.update(self.unrouted | self.classes)
        self.namespace.__dict__.update(Client=self.classes[sync], AsyncClient=self.classes[asynchronous])

    def _clients(self) -> dict[str, type]:
        """Every client class the SDK's module holds, by the name it has there (private ones included). Each
        value's type is read with `type()`: `isinstance` would ask openai's lazy module attributes (`openai.chat`)
        for their class, which builds its module-level client (2 s of imports, and an error without
        OPENAI_API_KEY)."""
        base = getattr(getattr(self.module, "_base_client", None), "BaseClient", None)
        if base is None:
            return {}
        return {name: value for name, value in list(vars(self.module).items())
                if issubclass(type(value), type) and issubclass(value, base)}  # fmt: skip

    def _subclass(self, name: str, asynchronous: bool, cloud: clouds.Cloud | None = None) -> type:
        """The SDK's client class `name` with the pool's transport: `isinstance` checks still pass."""
        sdk, lib = self, self.lib

        def __init__(self, *, pool: Pool | str | None = None, pool_profile: str | None = None,
                     broker_timeout: float = 10.0, **kwargs: Any) -> None:  # fmt: skip
            options = sdk.options(asynchronous, pool, pool_profile, broker_timeout, kwargs, (name, cloud))
            super(cls, self).__init__(**options)

        # A per-call `timeout=` of the other library, converted before the SDK checks it (anthropic >= 1.4 does).
        def _prepare_options(self, options: Any) -> Any:
            options.timeout = httplib.timeout_for(options.timeout, lib)
            return super(cls, self)._prepare_options(options)

        async def _prepare_options_async(self, options: Any) -> Any:
            options.timeout = httplib.timeout_for(options.timeout, lib)
            return await super(cls, self)._prepare_options(options)

        def copy(self, *args: Any, **kwargs: Any) -> Any:
            """The SDK's copy() and with_options(): a max_retries given here, 0 included, goes to the copy's
            pool budget (`options`), which cannot tell a given 0 from the one the SDK passes where none is
            given: this client's own max_retries, 0 in a shim client, as the pool retries."""
            given = kwargs.get("max_retries")
            token = _GIVEN_RETRIES.set(given if isinstance(given, int) else None)
            try:
                return super(cls, self).copy(*args, **kwargs)
            finally:
                _GIVEN_RETRIES.reset(token)

        prepare = _prepare_options_async if asynchronous else _prepare_options
        members = {"__init__": __init__, "_prepare_options": prepare, "copy": copy, "with_options": copy,
                   "__module__": __name__}  # fmt: skip
        if cloud is not None and cloud.decodes_sse:
            # anthropic >= 2.16 passes the request's options (Bedrock's control-plane calls answer in SSE)
            members["_make_sse_decoder"] = lambda self, *_: clouds.sse_decoder(sdk.module)
        cls = type(name, (getattr(self.module, name),), members)
        return cls

    def options(
        self,
        asynchronous: bool,
        pool: Any,
        profile: str | None,
        broker_timeout: float,
        kwargs: dict[str, Any],
        named: tuple[str, clouds.Cloud | None] = ("", None),
    ) -> dict[str, Any]:
        """The SDK constructor's arguments with the pool's transport in place of its HTTP client, and
        the SDK's retries handed to the pool: its client gets max_retries=0, and the caller's
        `max_retries` (the SDK's default 2) + 1 is each call's attempt budget in the pool. A caller's
        own `http_client` lends the pool's client what still applies (`httplib.settings_of`). A cloud
        class (`named`: its name and cloud) gets stand-ins and its placement (shim/clouds.py)."""
        cls, cloud = named
        if (
            "profile" in kwargs and "profile" not in self.accepted
        ):  # what named the pool's profile before anthropic took it
            raise TypeError(
                "the pool's profile is chosen with pool_profile=NAME (profile= is anthropic's own, >= 0.125)"
            )
        base_url = kwargs.pop("base_url", None)
        http_client = kwargs.pop("http_client", None)
        retries = kwargs.pop("max_retries", None)
        if "timeout" in kwargs:
            kwargs["timeout"] = httplib.timeout_for(kwargs["timeout"], self.lib)
        if http_client is not None and str(base_url).startswith(SHIM_BASE_URL):  # the SDK's copy()/with_options()
            transport, changes = http_client._transport, {}
            if (given := _GIVEN_RETRIES.get()) is not None:  # with_options(max_retries=N): N + 1 attempts a call
                changes["attempts"] = given + 1
            if cloud is not None and (placed := cloud.placement_of(kwargs)) and placed != transport.placement:
                changes["placement"] = {**transport.placement, **placed}  # with_options(aws_region=...)
            if changes:
                transport = transport.changed(**changes)
                http_client = type(http_client)(transport=transport, **httplib.settings_of(http_client, self.lib))
            return {**kwargs, "base_url": base_url, "http_client": http_client, "max_retries": 0}
        if cloud is not None and _names_embedded(pool) and (lacking := missing(cloud.kind)):  # it has no such profile
            raise ImportError(f"{cls}: the pool's workers sign its requests, and {lacking}")
        url, placement, base_path = pool_url(pool), {}, BASE_PATH
        if cloud is not None:
            given = {**kwargs, "base_url": base_url}
            overrides = cloud.names_overrides(given) and _allows_overrides(url, broker_timeout)
            cloud.refuse_credentials(cls, given, overrides)
            placement, base_path = cloud.placement_of(given, overrides), BASE_PATH + cloud.relative
            profile, base_url, kwargs = profile or cloud.kind, None, cloud.stand_in(kwargs)
        for name in _OWN_CONNECTION:  # anthropic 0.x's: a connection the worker makes (warned at the caller)
            if kwargs.pop(name, None) is not None:
                warnings.warn(f"{name}= is ignored: the pool's workers make the HTTP requests", stacklevel=3)
        settings = httplib.settings_of(http_client, self.lib) if http_client is not None else {}
        profile, base_url = profile or self.kind, str(base_url or "")
        if base_url.rstrip("/") == DEFAULT_BASE_URLS[self.kind]:  # spelt out, as LangChain does: the provider's
            base_url = ""
        own = cloud is None and (base_url or any(kwargs.get(name) for name in self.credentials))  # api_key="": none
        if own and not _allows_overrides(url, broker_timeout):
            raise ValueError(
                f"the pool at {url} holds the provider keys and does not allow a client's own credentials or "
                "base_url (setting allow_overrides); drop them, or configure a provider profile and pass "
                "pool_profile=NAME"
            )
        attempts = (self.module.DEFAULT_MAX_RETRIES if retries is None else retries) + 1
        sync_transport, async_transport = self.transports
        if asynchronous:
            transport = async_transport(url, profile, base_path, self.errors, broker_timeout, base_url, attempts,
                                        placement)  # fmt: skip
            client: Any = self.lib.AsyncClient(transport=transport, **settings)
        else:
            connection = functools.partial(_sync_client, url, broker_timeout)
            transport = sync_transport(connection, profile, base_path, self.errors, base_url, attempts, placement)
            client = self.lib.Client(transport=transport, **settings)
        if not own and cloud is None:  # the pool's key then (in the worker); the SDK wants one to build requests
            kwargs["api_key"] = STAND_IN_KEY
        where = {(cloud.endpoint if cloud is not None and cloud.endpoint else "base_url"): SHIM_BASE_URL}
        return {**kwargs, **where, "http_client": client, "max_retries": 0}


@functools.cache
def _sdk(kind: str) -> _Sdk:
    return _Sdk(kind)


def installed() -> list[str]:
    """The SDKs this environment holds (`anthropic`, `openai`), without importing them."""
    return [kind for kind in _CLASSES if importlib.util.find_spec(kind) is not None]


def __getattr__(name: str) -> Any:
    """`anthropic`, `openai` (the SDK's namespace with the pool's clients) and the four client classes,
    each built when first asked for: only the SDK a caller uses is imported."""
    if name in _CLASSES:
        return _sdk(name).namespace
    for kind, classes in _CLASSES.items():
        if name in classes or (name in clouds.CLASSES[kind] and name in _sdk(kind).classes):
            return _sdk(kind).classes[name]
        if kind in sys.modules and name in (wrappers := _sdk(kind).unrouted | _sdk(kind).module_clients):
            return wrappers[name]  # pickle's lookup of one (its SDK is imported)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UnroutedClientWarning(RuntimeWarning):
    """A client class the pool does not route was made: its calls go straight to the provider."""


# What a warning calls the SDK's module-level client, which a script uses without making a client object.
_MODULE_CLIENT = "{kind}'s module-level client ({kind}.chat.completions.create(...) and the like, with no client)"


def _unrouted(original: type, routed: list[str], what: str = "") -> type:
    """`original` unchanged but for a warning when one is made: under `isopool run` a script's client of a
    class the pool does not route yet (AnthropicAWS, BedrockOpenAI, openai's module-level client, ...) would
    otherwise run unprotected without a word. `what`: the name the warning gives it (the class's own name)."""

    warned = False
    sdk_dir = os.path.dirname(sys.modules[original.__module__.partition(".")[0]].__file__ or "") + os.sep

    @functools.wraps(original.__init__)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal warned
        if not warned:  # its copies (`with_options`) are made by the SDK, not by the caller: not warned of again
            warnings.warn(
                f"{what or original.__name__} is not routed through the isopool pool: its calls go straight to the "
                f"provider, with no stall protection and no retries by the pool. The pool routes "
                f"{', '.join(routed)}.",
                UnroutedClientWarning,
                stacklevel=_outside(sdk_dir),
            )
        super(cls, self).__init__(*args, **kwargs)
        warned = True  # once made: a build that failed (no key yet, or this warning raised by -W error) warns again

    cls = type(original.__name__, (original,), {"__init__": __init__, "__module__": __name__})
    return cls


def _outside(sdk_dir: str) -> int:
    """The stack level of the first caller outside the SDK (its module-level client is built several calls
    deep in openai): the script's line the warning then names, which a `-W` filter on its module matches."""
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(sdk_dir):
        frame, level = frame.f_back, level + 1
    return level


def install() -> None:
    """Put the pool's client classes into the real `anthropic` and `openai` modules (those installed),
    and the cloud classes also into the SDK modules that define and export them (`anthropic.lib.bedrock`,
    `openai.lib.azure`, ...), so that a script runs through the pool without a change (`isopool run`).
    Module-level clients such as `openai.chat.completions` are not routed (they are built from private
    classes, which changed shape between releases); each warns when built, as the unrouted classes do."""
    for kind in installed():
        sdk = _sdk(kind)
        submodules = [m for n, m in list(sys.modules.items()) if n.startswith(f"{kind}.") and m is not None]
        for name, cls in (sdk.unrouted | sdk.classes).items():
            original = getattr(sdk.module, name)
            for module in (sdk.module, *submodules):
                if getattr(module, name, None) is original:
                    setattr(module, name, cls)
        for name, cls in sdk.module_clients.items():  # looked up in the SDK's module when its client is built
            setattr(sdk.module, name, cls)
        sync, asynchronous = _CLASSES[kind]
        sdk.module.Client, sdk.module.AsyncClient = sdk.classes[sync], sdk.classes[asynchronous]


__all__ = [
    "UnroutedClientWarning",
    "Anthropic",
    "AnthropicBedrock",
    "AnthropicFoundry",
    "AnthropicVertex",
    "AsyncAnthropic",
    "AsyncAnthropicBedrock",
    "AsyncAnthropicFoundry",
    "AsyncAnthropicVertex",
    "AsyncAzureOpenAI",
    "AsyncOpenAI",
    "AzureOpenAI",
    "OpenAI",
    "anthropic",
    "install",
    "openai",
    "pool_url",
]
