"""What a pool failure looks like to code written for the SDKs.

Before any output the pool has already retried what it could; what is left is raised
as an `httpx2` timeout or connection error, which the caller's SDK turns into its own
`APITimeoutError` / `APIConnectionError` (its own retries are the pool's: max_retries=0). After output
has been delivered the SDK no longer wraps errors, so the shim raises subclasses of those
same SDK classes itself, carrying the pool's request id and what was delivered.
"""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import openai

from ..errors import AttemptsExhausted, DeadlineExceeded, IsopoolError, StreamStalled

_TIMEOUTS = (StreamStalled, AttemptsExhausted, DeadlineExceeded)


class _AfterOutput:
    """Mixin: the SDK's connection error class with the pool's details."""

    _sdk_base: type  # the SDK's APIConnectionError, whose constructor takes the message

    def __init__(self, exc: IsopoolError, request: httpx2.Request) -> None:
        self._sdk_base.__init__(self, message=str(exc), request=request)
        self.pool_request_id = getattr(exc, "request_id", None)
        self.delivered = getattr(exc, "delivered", 0)
        self.pool_rescue = getattr(getattr(exc, "info", None), "rescue", "")  # why a broken stream was not continued


class AnthropicStreamStalled(_AfterOutput, anthropic.APITimeoutError):
    """A stream stalled after it delivered output; not retried (its start was already read)."""

    _sdk_base = anthropic.APIConnectionError


class AnthropicStreamBroken(_AfterOutput, anthropic.APIConnectionError):
    """A stream's worker or connection was lost after it delivered output."""

    _sdk_base = anthropic.APIConnectionError


class OpenAIStreamStalled(_AfterOutput, openai.APITimeoutError):
    """A stream stalled after it delivered output; not retried (its start was already read)."""

    _sdk_base = openai.APIConnectionError


class OpenAIStreamBroken(_AfterOutput, openai.APIConnectionError):
    """A stream's worker or connection was lost after it delivered output."""

    _sdk_base = openai.APIConnectionError


class SdkErrors:
    """The error classes of one SDK."""

    def __init__(self, stalled: type, broken: type) -> None:
        self._stalled, self._broken = stalled, broken

    def before_output(self, exc: IsopoolError, request: httpx2.Request) -> Exception:
        """The httpx2 error the caller's SDK wraps (as the `__cause__` of its own error)."""
        cls: Any = httpx2.ReadTimeout if isinstance(exc, _TIMEOUTS) else httpx2.ConnectError
        return _where(cls(f"isopool: {exc}", request=request), exc)

    def after_output(self, exc: IsopoolError, request: httpx2.Request) -> Exception:
        return _where((self._stalled if isinstance(exc, _TIMEOUTS) else self._broken)(exc, request), exc)


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


ANTHROPIC = SdkErrors(AnthropicStreamStalled, AnthropicStreamBroken)
OPENAI = SdkErrors(OpenAIStreamStalled, OpenAIStreamBroken)
