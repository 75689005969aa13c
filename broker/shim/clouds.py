"""The shim's cloud clients: `AnthropicBedrock`, `AnthropicVertex` and `AzureOpenAI` (and their async
twins), whose requests are signed in the pool's workers, never in the caller's process.

The SDK's class builds each request as usual (Bedrock's and Vertex's paths, `anthropic_version`,
Azure's deployment paths), but with stand-ins where it would authenticate: a stand-in key that its
hooks put on the request as a bearer or `api-key` (so neither botocore nor google-auth is imported
here), and a stand-in region, project or api-version where the caller gave none (the worker uses its
profile's). Where the caller did name its region, project or endpoint, that is the request's
placement: the worker refuses one that is not its profile's unless the pool allows overrides (an
EU-pinned client must not silently send to a US profile). Credentials are refused here: the workers sign.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .transport import STAND_IN_KEY


@dataclass(frozen=True)
class Cloud:
    """What a cloud class of the shim needs: the pool profile it uses unless `pool_profile=` names another,
    its placement arguments (constructor argument -> placement name), the arguments its SDK needs to
    build a request (given a stand-in when absent), and the credentials the workers hold instead."""

    kind: str
    placement: dict[str, str]
    stand_ins: tuple[str, ...]
    credentials: tuple[str, ...]
    endpoint: str = ""  # the constructor argument that takes the shim's base URL in place of `base_url`
    relative: str = ""  # what the SDK adds to the base URL that the profile's base URL already holds
    decodes_sse: bool = field(default=False)  # the SDK's stream decoder is replaced by SSE's (Bedrock's is frames)

    def placement_of(self, kwargs: dict[str, Any]) -> dict[str, str]:
        """The placement the caller named (a stand-in names none)."""
        return {name: str(kwargs[arg]).rstrip("/") for arg, name in self.placement.items()
                if kwargs.get(arg) and kwargs[arg] != STAND_IN_KEY}  # fmt: skip

    def refuse_credentials(self, cls: str, kwargs: dict[str, Any]) -> None:
        given = [name for name in (*self.credentials, "base_url") if kwargs.get(name)]
        if given:
            raise ValueError(
                f"{cls} sends through the pool, whose workers sign its requests with the {self.kind} profile's "
                f"credentials: drop {', '.join(given)} (give the pool these credentials or that endpoint in a "
                f"profile of kind {self.kind}, and pass pool_profile=NAME)"
            )

    def stand_in(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**kwargs, **{arg: STAND_IN_KEY for arg in self.stand_ins if not kwargs.get(arg)}}


_BEDROCK = Cloud(
    "bedrock",
    placement={"aws_region": "region"},
    stand_ins=("aws_region", "api_key"),
    credentials=("aws_access_key", "aws_secret_key", "aws_session_token", "aws_profile", "api_key"),
    decodes_sse=True,
)
_VERTEX = Cloud(
    "vertex",
    placement={"region": "region", "project_id": "project"},
    stand_ins=("region", "project_id", "access_token"),
    credentials=("credentials", "access_token"),
)
_AZURE = Cloud(
    "azure",
    placement={"azure_endpoint": "endpoint"},
    stand_ins=("api_version", "api_key"),
    credentials=("api_key", "azure_ad_token", "azure_ad_token_provider", "workload_identity"),
    endpoint="azure_endpoint",
    relative="/openai",
)
# The shim's class name -> its cloud, per SDK.
CLASSES = {
    "anthropic": {"AnthropicBedrock": _BEDROCK, "AsyncAnthropicBedrock": _BEDROCK,
                  "AnthropicVertex": _VERTEX, "AsyncAnthropicVertex": _VERTEX},
    "openai": {"AzureOpenAI": _AZURE, "AsyncAzureOpenAI": _AZURE},
}  # fmt: skip


def sse_decoder(sdk_module: Any) -> Any:
    """The stream decoder of a Bedrock class in the shim: the worker relays its events as SSE."""
    return sdk_module._streaming.SSEDecoder()
