"""Claude on Amazon Bedrock: anthropic's AsyncAnthropicBedrock signs each request with SigV4 from the
AWS default credential chain (environment, config files and `aws_profile`, SSO, instance role), or
sends a Bedrock API key as a bearer token (`api_key_env`, else AWS_BEARER_TOKEN_BEDROCK)."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from broker.config import Profile


def build(module: Any, profile: Profile, key: str | None, **common: Any) -> Any:
    given = {"aws_region": profile.region, "aws_profile": profile.aws_profile, "api_key": key,
             "base_url": profile.base_url}  # fmt: skip
    return module.AsyncAnthropicBedrock(**{k: v for k, v in given.items() if v is not None}, **common)


def preload() -> None:
    """boto3 (the signer's session, 110 ms on a first sign), botocore's event-stream parser, and the
    Bedrock response-stream shape the SDK's decoder loads from botocore's service model (70 ms)."""
    import boto3  # noqa: F401
    import botocore.auth  # noqa: F401
    import botocore.eventstream  # noqa: F401
    from anthropic.lib.bedrock._stream_decoder import get_response_stream_shape

    get_response_stream_shape()


def placement(sdk: Any) -> dict[str, str | None]:
    return {"region": sdk.aws_region, "aws_profile": sdk.aws_profile, "base_url": str(sdk.base_url).rstrip("/")}


# The raw-HTTP relay (worker/exchange.py): paths relative to the client's base URL, as Bedrock's.
_INVOKE = re.compile(r"/model/[^/]+/invoke(-with-response-stream)?")


async def from_first_party(sdk: Any, call: Any, profile: Profile) -> Any:
    """`/v1/messages` (as an Anthropic client sends it) in this cloud's form; anything else as it is."""
    from . import messages_in_cloud_form

    return await messages_in_cloud_form(sdk, call)


def with_model(path: str, model: str, profile: Profile) -> str:
    """The path naming `model` (quoted as the SDK quotes it) in place of its own; another path as it is."""
    return _MODEL.sub(lambda m: m[1] + urllib.parse.quote(model, safe=":;") + m[3], path, count=1)


_MODEL = re.compile(r"^(/model/)([^/]+)(/invoke)")


def method_of(route: str) -> str | None:
    return "messages.create" if _INVOKE.fullmatch(route) else None


def streams(route: str, args: dict[str, Any]) -> bool:
    return route.endswith("-with-response-stream")  # Bedrock refuses `stream` in the body: the path says it


def stream_form(path: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    route, sep, query = path.partition("?")
    return f"{route}-with-response-stream{sep}{query}", args


async def authorize(sdk: Any, request: Any) -> None:
    """SigV4 over this attempt's final method, URL, headers and body (or the bearer API key)."""
    await sdk._prepare_request(request)
