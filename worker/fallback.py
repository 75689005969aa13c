"""What a fallback needs from the worker: the call sent to another model, and a provider's error
body read for what the broker cannot see in a status code.

The broker never decodes a payload: a fallback's model rides in the RUN header, and the worker
puts it in the call (the SDK call's kwargs; the JSON body of a relayed HTTP request, if it has one). A 400 says
"context length" or "content filter" only in its body, which is read here, once.
"""

from __future__ import annotations

from typing import Any

import msgspec

from broker.config import Profile
from broker.protocol import Call, HttpCall

from . import clouds

_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder()
# What a 400 over the context window says: Anthropic's (also on Bedrock and Vertex), Bedrock's own, Responses'
_CONTEXT_LENGTH = ("prompt is too long", "Input is too long for requested model", "exceeds the context window")


def retarget(call: Call | HttpCall, model: str, profile: Profile | None = None) -> Call | HttpCall:
    """`call` with `model` in place of its own. A request in a cloud's own form names its model in its
    path (Bedrock's `/model/M/invoke`, Vertex's `/models/M:rawPredict`, Azure's deployment), which the
    cloud then takes from there. A request whose body is not a JSON object (none, an upload) names no
    model there: it is sent as it is, to the fallback's profile (refusing it would answer the caller
    with the pool's 400 in place of any provider's answer)."""
    if isinstance(call, Call):
        return msgspec.structs.replace(call, kwargs={**call.kwargs, "model": model})
    if profile is not None and (cloud := clouds.relay(profile.kind)) is not None:
        if (path := cloud.with_model(call.path, model, profile)) != call.path:
            if profile.kind != "azure":  # Bedrock and Vertex refuse a model in the body
                return msgspec.structs.replace(call, path=path)
            call = msgspec.structs.replace(call, path=path)
            model = profile.azure_deployments.get(model, model)
    try:
        body = _DEC.decode(call.body) if call.body else None
    except msgspec.DecodeError:
        body = None
    if not isinstance(body, dict):
        return call
    return msgspec.structs.replace(call, body=_ENC.encode({**body, "model": model}))


def failure_of(status: int, body: bytes | None) -> str:
    """`context_length` or `content_filter` when a provider's 4xx body says so, else ""."""
    if status != 400 or not body:
        return ""
    try:
        decoded: Any = _DEC.decode(body)
    except msgspec.DecodeError:
        return ""
    error = decoded.get("error", decoded) if isinstance(decoded, dict) else None  # Bedrock's: {"message"} alone
    if not isinstance(error, dict):
        return ""
    code, message = str(error.get("code") or ""), str(error.get("message") or "")
    if code == "context_length_exceeded" or any(m in message for m in _CONTEXT_LENGTH):
        return "context_length"  # OpenAI (Chat, Responses) by code; Anthropic's, Bedrock's and the Responses wording
    if code in ("content_filter", "invalid_prompt"):
        return "content_filter"  # Azure OpenAI's filter; OpenAI's flagged prompt
    return ""
