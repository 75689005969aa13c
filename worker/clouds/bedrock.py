"""Claude on Amazon Bedrock: anthropic's AsyncAnthropicBedrock signs each request with SigV4 from the
AWS default credential chain (environment, config files and `aws_profile`, SSO, instance role), or
sends a Bedrock API key as a bearer token (`api_key_env`, else AWS_BEARER_TOKEN_BEDROCK)."""

from __future__ import annotations

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
