"""The shim's cloud clients: `AnthropicBedrock`, `AnthropicVertex` and `AzureOpenAI` (and their async
twins), whose requests are signed in the pool's workers, never in the caller's process.

The SDK's class builds each request as usual (Bedrock's and Vertex's paths, `anthropic_version`,
Azure's deployment paths), but with stand-ins where it would authenticate: a stand-in key that its
hooks put on the request as a bearer or `api-key` (so neither botocore nor google-auth is imported
here), and a stand-in region, project or api-version where the caller gave none (the worker uses its
profile's). Where the caller did name its region, project or endpoint, that is the request's
placement: the worker refuses one that is not its profile's unless the pool allows overrides (an
EU-pinned client must not silently send to a US profile). Credentials are refused here: the workers sign.
Its own base URL (or AWS config profile) is carried the same way, but only to a pool that allows overrides.

The embedded pool (`isopool run`, or a shim client with no pool named) is the caller's own: it holds a
dormant profile of each cloud kind whose libraries are installed (`embedded_settings`), whose workers
read the region, project, endpoint, api-version and credentials from this process's environment, as the
SDK would, unless the client named its own placement, which that pool serves.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..config import FAMILIES, Profile, Settings
from ..extras import missing
from .transport import STAND_IN_KEY


@dataclass(frozen=True)
class Cloud:
    """What a cloud class of the shim needs: the pool profile it uses unless `pool_profile=` names another,
    its placement arguments (constructor argument -> placement name, a field of its profile), the
    arguments its SDK needs to build a request (given a stand-in when absent), the credentials the workers
    hold instead, and the arguments a pool that allows overrides takes as placement (others refuse them)."""

    kind: str
    placement: dict[str, str]
    stand_ins: tuple[str, ...]
    credentials: tuple[str, ...]
    overrides: dict[str, str] = field(default_factory=dict)
    endpoint: str = ""  # the constructor argument that takes the shim's base URL in place of `base_url`
    dropped: tuple[str, ...] = ()  # placement arguments the SDK must not see (the shim's base URL replaces them)
    relative: str = ""  # what the SDK adds to the base URL that the profile's base URL already holds
    decodes_sse: bool = field(default=False)  # the SDK's stream decoder is replaced by SSE's (Bedrock's is frames)

    def placement_of(self, kwargs: dict[str, Any], overrides: bool = False) -> dict[str, str]:
        """The placement the caller named (a stand-in names none); with `overrides`, its own base URL too."""
        named = {**self.placement, **self.overrides} if overrides else self.placement
        return {name: str(kwargs[arg]).rstrip("/") for arg, name in named.items()
                if kwargs.get(arg) and kwargs[arg] != STAND_IN_KEY}  # fmt: skip

    def names_overrides(self, kwargs: dict[str, Any]) -> bool:
        return any(kwargs.get(arg) for arg in self.overrides)

    def refuse_credentials(self, cls: str, kwargs: dict[str, Any], overrides: bool = False) -> None:
        """The credentials (and without `overrides`, its own base URL) the caller gave: a ValueError."""
        names = dict.fromkeys((*self.credentials, *self.overrides, "base_url"))
        if given := [name for name in names if kwargs.get(name) and not (overrides and name in self.overrides)]:
            raise ValueError(
                f"{cls} sends through the pool, whose workers sign its requests with the {self.kind} profile's "
                f"credentials: drop {', '.join(given)} (give the pool these credentials or that endpoint in a "
                f"profile of kind {self.kind}, and pass pool_profile=NAME; an embedded pool's workers read them "
                "from this process's environment, as the SDK would)"
            )

    def stand_in(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The SDK's arguments: the shim's own where it builds the request, stand-ins where it wants one."""
        kept = {k: v for k, v in kwargs.items() if k != self.endpoint and k not in (*self.overrides, *self.dropped)}
        return {**kept, **{arg: STAND_IN_KEY for arg in self.stand_ins if not kwargs.get(arg)}}


_BEDROCK = Cloud(
    "bedrock",
    placement={"aws_region": "region"},
    stand_ins=("aws_region", "api_key"),
    credentials=("aws_access_key", "aws_secret_key", "aws_session_token", "api_key"),
    overrides={"base_url": "base_url", "aws_profile": "aws_profile"},
    decodes_sse=True,
)
_VERTEX = Cloud(
    "vertex",
    placement={"region": "region", "project_id": "project"},
    stand_ins=("region", "project_id", "access_token"),
    credentials=("credentials", "access_token"),
    overrides={"base_url": "base_url"},
)
_AZURE = Cloud(
    "azure",
    placement={"azure_endpoint": "endpoint", "api_version": "api_version"},  # api_version: only where none is set
    stand_ins=("api_version", "api_key"),
    credentials=("api_key", "azure_ad_token", "azure_ad_token_provider", "workload_identity"),
    endpoint="azure_endpoint",
    relative="/openai",
)
_FOUNDRY = Cloud(
    "foundry",
    placement={"resource": "resource"},
    stand_ins=("api_key",),
    credentials=("api_key", "azure_ad_token_provider"),
    overrides={"base_url": "base_url"},
    dropped=("resource",),
)
# The shim's class name -> its cloud, per SDK.
CLASSES = {
    "anthropic": {"AnthropicBedrock": _BEDROCK, "AsyncAnthropicBedrock": _BEDROCK,
                  "AnthropicVertex": _VERTEX, "AsyncAnthropicVertex": _VERTEX,
                  "AnthropicFoundry": _FOUNDRY, "AsyncAnthropicFoundry": _FOUNDRY},
    "openai": {"AzureOpenAI": _AZURE, "AsyncAzureOpenAI": _AZURE},
}  # fmt: skip


CLOUD_KINDS = ("bedrock", "vertex", "azure", "foundry")


def installed(kind: str) -> bool:
    """Whether a worker here can run a profile of this cloud kind: its SDK and its libraries."""
    return importlib.util.find_spec(FAMILIES[kind]) is not None and not missing(kind)


def embedded_settings(settings: Settings) -> Settings:
    """The embedded pool's settings: those given, plus a dormant profile (no worker until a call comes) of
    each cloud kind that has none and whose libraries are installed, configured by nothing but the
    environment its workers inherit and the placement each client names."""
    have = {p.kind for p in settings.profiles.values()} | set(settings.profiles)
    dormant = {kind: Profile(kind=kind, min_workers=0, spare_workers=0)  # type: ignore[arg-type]
               for kind in CLOUD_KINDS if kind not in have and installed(kind)}  # fmt: skip
    return msgspec.structs.replace(settings, profiles={**settings.profiles, **dormant}) if dormant else settings


def sse_decoder(sdk_module: Any) -> Any:
    """The stream decoder of a Bedrock class in the shim: the worker relays its events as SSE."""
    return sdk_module._streaming.SSEDecoder()
