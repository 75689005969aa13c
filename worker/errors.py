"""SDK exceptions translated once, in the worker, into data that can cross a process.

SDK exceptions hold live request/response objects; the caller's side rebuilds the
SDK's own exception class from this `ErrorInfo` (status, body and headers intact).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from broker.errors import ConfigError
from broker.protocol import Code, ErrorInfo

from . import clouds, sdks
from .assemble import ProviderStreamError
from .calls import BadCall
from .exchange import ProviderHttpError
from .fallback import failure_of
from .frames import FramesCorrupted
from .hygiene import StreamIncomplete

_ENC = msgspec.json.Encoder()


def _status_body(exc: Any) -> bytes:
    try:
        return exc.response.content
    except Exception:  # the body was never read (a streamed response)
        return _ENC.encode(exc.body)


def translate(exc: BaseException) -> ErrorInfo:
    """Most specific first; everything unknown is INTERNAL, with its type name. Only the SDKs
    this process imported are looked at: no other SDK's exception can reach here."""
    name = type(exc).__name__
    if isinstance(exc, sdks.errors("APIStatusError")):
        body = _status_body(exc)
        return ErrorInfo(
            Code.PROVIDER_STATUS,
            str(exc),
            status=exc.status_code,
            body=body,
            headers=list(exc.response.headers.items()),
            error_type=name,
            failure=failure_of(exc.status_code, body),
        )
    if isinstance(exc, ProviderHttpError):
        return ErrorInfo(Code.PROVIDER_STATUS, str(exc), exc.status, exc.body, exc.headers, error_type="APIStatusError",
                         failure=failure_of(exc.status, exc.body))  # fmt: skip
    if isinstance(exc, sdks.errors("APITimeoutError")):
        return ErrorInfo(Code.PROVIDER_TIMEOUT, str(exc), error_type=name)
    if isinstance(exc, sdks.errors("APIConnectionError")):
        cause = exc.__cause__
        detail = f"{exc} ({type(cause).__name__}: {cause})" if cause else str(exc)
        return ErrorInfo(Code.PROVIDER_CONNECTION, detail, error_type=name)
    # raised by a raw stream read (outside the SDK's wrapping) or by a load test's aiohttp transport
    if isinstance(exc, (*sdks.http_errors("TimeoutException"), aiohttp.ServerTimeoutError)):
        return ErrorInfo(Code.PROVIDER_TIMEOUT, f"{name}: {exc}", error_type=name)
    # e.g. the connection was reset mid-stream, or its event-stream frames fail their checksums
    if isinstance(exc, (*sdks.http_errors("TransportError"), aiohttp.ClientError, FramesCorrupted)):
        detail = f"{name}: {exc}" if str(exc) else name
        return ErrorInfo(Code.PROVIDER_CONNECTION, f"connection to the provider lost ({detail})", error_type=name)
    if isinstance(exc, StreamIncomplete):
        return ErrorInfo(Code.STREAM_INCOMPLETE, str(exc), error_type=name)
    if isinstance(exc, ProviderStreamError):
        return ErrorInfo(Code.PROVIDER_STREAM, f"error event mid-stream: {exc}", body=_ENC.encode(exc.body))
    if isinstance(exc, sdks.errors("APIError")):
        return ErrorInfo(Code.PROVIDER_STREAM, str(exc), body=_ENC.encode(exc.body), error_type=name)
    if isinstance(exc, (BadCall, TypeError)):
        return ErrorInfo(Code.BAD_REQUEST, str(exc), error_type=name)
    if isinstance(exc, (*sdks.errors(), ConfigError)) or clouds.is_credential_error(exc):
        return ErrorInfo(Code.CONFIG, str(exc), error_type=name)
    return ErrorInfo(Code.INTERNAL, f"{name}: {exc}", error_type=name)
