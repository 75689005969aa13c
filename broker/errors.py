"""Exceptions raised to callers of the pool.

    ConfigError (a ValueError)       a setting is missing, unknown or out of range: fix it and start again
    IsopoolError
    ├── BrokerUnavailable            no broker answered within the client's timeout
    │   └── BrokerRefused            the broker refused this client's CURVE keys, or its lack of them
    ├── ClientClosed                 the client was used after close()
    └── RequestError                 one request ended in an error (.code, .info, .request_id)
        ├── ProviderError            the provider answered with an error (not a stall)
        │   ├── ProviderStatusError      HTTP 4xx/5xx after the pool's retries (.status, .body, .headers)
        │   ├── ProviderStreamError      an `error` event in the middle of a stream
        │   ├── StreamIncomplete         the stream ended without its terminal event: cut short, never a success
        │   └── ProviderConnectionError  the SDK could not reach the provider
        │       └── ProviderTimeoutError the SDK's own HTTP timeout
        ├── StreamStalled            the stream stalled after the caller saw output; not retried
        ├── WorkerLost               the worker died after the caller saw output; not retried
        ├── AttemptsExhausted        every attempt stalled or lost its worker
        ├── DeadlineExceeded         the request's whole-request deadline passed
        ├── PoolSaturated            the pool's queue (or this connection's share) is full: back off and retry
        │   └── RateLimited          over this connection's client_rate: retry after the time in the message
        ├── Cancelled                cancelled by the caller, or the caller went away
        ├── ShuttingDown             the pool is draining
        ├── BadRequest               unknown profile or method, bad or refused arguments
        ├── WorkerConfigError        the worker could not build its SDK client (e.g. no API key)
        ├── ProtocolViolation        the broker could not read what was sent
        └── InternalError            a bug: please report it with the message

Broker-side codes are translated in one place, `error_for`, most specific first.
"""

from __future__ import annotations

import msgspec

from .protocol import Code, ErrorInfo, Served


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names it."""


class IsopoolError(Exception):
    """Base of every isopool exception."""


class BrokerUnavailable(IsopoolError):
    """No broker answered: start one (`isopool serve`) or check ISOPOOL_URL."""


class BrokerRefused(BrokerUnavailable):
    """The broker refused this client's CURVE keys (or its lack of them): the message says which to set."""


class ClientClosed(IsopoolError):
    """The client was closed; make a new one."""


class RequestError(IsopoolError):
    code: Code = Code.INTERNAL

    def __init__(self, info: ErrorInfo, request_id: int = 0) -> None:
        super().__init__(f"[{info.code}] {info.message}" + (f" (request {request_id})" if request_id else ""))
        self.info = info
        self.request_id = request_id
        self.served: Served | None = None  # where it last ran (attempts, profile, deployment, model)

    @property
    def delivered(self) -> int:
        """How many events the caller had received before the error."""
        return self.info.delivered


class ProviderError(RequestError):
    pass


class ProviderStatusError(ProviderError):
    code = Code.PROVIDER_STATUS

    @property
    def status(self) -> int | None:
        return self.info.status

    @property
    def body(self) -> object:
        return msgspec.json.decode(self.info.body) if self.info.body else None

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.info.headers)


class ProviderStreamError(ProviderError):
    code = Code.PROVIDER_STREAM


class StreamIncomplete(ProviderError):
    """The provider's stream ended cleanly but without its terminal event (Anthropic `message_stop`,
    Chat Completions' finish_reason or `[DONE]`, Responses' `response.completed`): what was delivered
    may be only part of the answer, so it is never passed off as one."""

    code = Code.STREAM_INCOMPLETE


class ProviderConnectionError(ProviderError):
    code = Code.PROVIDER_CONNECTION


class ProviderTimeoutError(ProviderConnectionError):
    code = Code.PROVIDER_TIMEOUT


class StreamStalled(RequestError):
    code = Code.STALLED


class WorkerLost(RequestError):
    code = Code.WORKER_LOST


class AttemptsExhausted(RequestError):
    code = Code.ATTEMPTS_EXHAUSTED


class DeadlineExceeded(RequestError):
    code = Code.DEADLINE


class PoolSaturated(RequestError):
    code = Code.SATURATED


class RateLimited(PoolSaturated):
    code = Code.RATE_LIMITED


class Cancelled(RequestError):
    code = Code.CANCELLED


class ShuttingDown(RequestError):
    code = Code.SHUTTING_DOWN


class BadRequest(RequestError):
    code = Code.BAD_REQUEST


class WorkerConfigError(RequestError):
    code = Code.CONFIG


class ProtocolViolation(RequestError):
    code = Code.PROTOCOL


class InternalError(RequestError):
    code = Code.INTERNAL


BY_CODE: dict[Code, type[RequestError]] = {
    cls.code: cls
    for cls in (
        ProviderStatusError,
        ProviderStreamError,
        StreamIncomplete,
        ProviderConnectionError,
        ProviderTimeoutError,
        StreamStalled,
        WorkerLost,
        AttemptsExhausted,
        DeadlineExceeded,
        PoolSaturated,
        RateLimited,
        Cancelled,
        ShuttingDown,
        BadRequest,
        WorkerConfigError,
        ProtocolViolation,
        InternalError,
    )
}


def error_for(info: ErrorInfo, request_id: int = 0) -> RequestError:
    """The exception for an ERROR; an unknown code (a newer broker) becomes InternalError."""
    try:
        cls = BY_CODE[Code(info.code)]
    except ValueError:
        cls = InternalError
    return cls(info, request_id)
