"""What a pool failure looks like to code written for the installed SDK (either generation).

Before any output the pool has already retried what it could; what is left is raised as the
SDK's HTTP library's timeout or connection error, which the caller's SDK turns into its own
`APITimeoutError` / `APIConnectionError` (its own retries are the pool's: max_retries=0). After output
has been delivered the SDK no longer wraps errors, so the shim raises subclasses of those
same SDK classes itself, carrying the pool's request id and what was delivered.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ..errors import AttemptsExhausted, DeadlineExceeded, IsopoolError, StreamStalled

_TIMEOUTS = (StreamStalled, AttemptsExhausted, DeadlineExceeded)
_PREFIX = {"anthropic": "Anthropic", "openai": "OpenAI"}


class _AfterOutput:
    """Mixin: the SDK's connection error class with the pool's details."""

    _sdk_base: type  # the SDK's APIConnectionError, whose constructor takes the message

    def __init__(self, exc: IsopoolError, request: Any) -> None:
        self._sdk_base.__init__(self, message=str(exc), request=request)
        self.pool_request_id = getattr(exc, "request_id", None)
        self.delivered = getattr(exc, "delivered", 0)
        self.pool_rescue = getattr(getattr(exc, "info", None), "rescue", "")  # why a broken stream was not continued


class SdkErrors:
    """The error classes of one installed SDK, on its HTTP library `lib`: `<Sdk>StreamStalled` (a
    stream stalled after it delivered output; not retried, its start was already read) and
    `<Sdk>StreamBroken` (its worker or connection was lost after output)."""

    def __init__(self, sdk: ModuleType, lib: ModuleType) -> None:
        self._lib, prefix = lib, _PREFIX[sdk.__name__]
        base = {"_sdk_base": sdk.APIConnectionError, "__module__": __name__}
        self.stalled = type(f"{prefix}StreamStalled", (_AfterOutput, sdk.APITimeoutError), base)
        self.broken = type(f"{prefix}StreamBroken", (_AfterOutput, sdk.APIConnectionError), base)

    def before_output(self, exc: IsopoolError, request: Any) -> Exception:
        """The HTTP library's error the caller's SDK wraps (as the `__cause__` of its own error)."""
        cls: Any = self._lib.ReadTimeout if isinstance(exc, _TIMEOUTS) else self._lib.ConnectError
        return _where(cls(f"isopool: {exc}", request=request), exc)

    def after_output(self, exc: IsopoolError, request: Any) -> Exception:
        return _where((self.stalled if isinstance(exc, _TIMEOUTS) else self.broken)(exc, request), exc)


def _where(error: Exception, exc: IsopoolError) -> Exception:
    """Say where the call last ran: `pool_profile`, `pool_deployment`, `pool_model`, `pool_attempts`,
    and (for the pool's own errors) `pool_tried`, each failed attempt as `group:reason`."""
    served = getattr(exc, "served", None)
    error.pool_profile = served.profile if served else ""  # type: ignore[attr-defined]
    error.pool_deployment = served.deployment if served else ""  # type: ignore[attr-defined]
    error.pool_model = served.model if served else ""  # type: ignore[attr-defined]
    error.pool_attempts = served.attempts if served else 0  # type: ignore[attr-defined]
    error.pool_tried = list(getattr(getattr(exc, "info", None), "tried", []))  # type: ignore[attr-defined]
    return error
