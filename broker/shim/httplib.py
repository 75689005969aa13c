"""The caller's HTTP objects made fit for the HTTP library its SDK is built on (`broker.sdklib`).

Each SDK checks that its `http_client` is its own library's client (anthropic >= 1.4 refuses the
other library's `Timeout` too), so the shim builds its transport on the SDK's own library, and
converts what an application written for the other generation passes.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from ..sdklib import LIBRARIES


def timeout_for(value: Any, lib: ModuleType) -> Any:
    """`value` as the SDK on `lib` accepts it: another library's `Timeout` converted, all else as it is.
    (By class, not by `__module__`: each SDK renames the classes it re-exports, httpx's or httpx2's, to its own.)"""
    for other in filter(None, map(sys.modules.get, LIBRARIES)):  # a Timeout's library is loaded
        if other is not lib and isinstance(value, other.Timeout) and not isinstance(value, lib.Timeout):
            return lib.Timeout(**value.as_dict())
    return value


def settings_of(http_client: Any, lib: ModuleType) -> dict[str, Any]:
    """What of the caller's own `http_client` still applies when a worker sends the request: its timeout,
    headers, query parameters, event hooks and redirects. Its transport, proxies, limits and TLS settings
    configure a connection the caller no longer makes; the worker's own do."""
    return {
        "timeout": timeout_for(http_client.timeout, lib),
        "headers": list(http_client.headers.multi_items()),
        "params": list(http_client.params.multi_items()),
        "event_hooks": {name: list(hooks) for name, hooks in http_client.event_hooks.items()},
        "follow_redirects": http_client.follow_redirects,
    }
