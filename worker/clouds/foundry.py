"""Claude in Microsoft Foundry: anthropic's AsyncAnthropicFoundry, Anthropic's own API at the resource's
`https://RESOURCE.services.ai.azure.com/anthropic/`, with an API key (`api_key_env`, else
ANTHROPIC_FOUNDRY_API_KEY) or, with `auth = "entra"`, an Entra ID token from azure-identity's
DefaultAzureCredential, asked for on every request by the SDK's token provider (as Azure OpenAI's)."""

from __future__ import annotations

import re
from typing import Any

from broker.config import Profile

from . import prepared_headers
from .azure import preload as preload

SCOPE = "https://ai.azure.com/.default"  # the SDK's own example's (anthropic/lib/foundry.md)

_RESOURCE = re.compile(r"https://([^./]+)\.services\.ai\.azure\.com/anthropic/?")


def build(module: Any, profile: Profile, key: str | None, **common: Any) -> Any:
    given: dict[str, Any] = {"resource": None if profile.base_url else profile.resource, "api_key": key,
                             "base_url": profile.base_url}  # fmt: skip
    if profile.auth == "entra":
        from azure.identity.aio import DefaultAzureCredential, get_bearer_token_provider

        given["azure_ad_token_provider"] = get_bearer_token_provider(DefaultAzureCredential(), SCOPE)
    return module.AsyncAnthropicFoundry(**{k: v for k, v in given.items() if v is not None}, **common)


def placement(sdk: Any) -> dict[str, str | None]:
    match = _RESOURCE.fullmatch(str(sdk.base_url))
    return {"resource": match[1] if match else None, "base_url": str(sdk.base_url).rstrip("/")}


# The raw-HTTP relay (worker/exchange.py): Anthropic's own paths, relative to the resource's base URL.
async def from_first_party(sdk: Any, call: Any, profile: Profile) -> Any:
    return call


def with_model(path: str, model: str, profile: Profile) -> str:
    return path  # the model is in the body


def method_of(route: str) -> str | None:
    return "messages.create" if route == "/v1/messages" else None


def streams(route: str, args: dict[str, Any]) -> bool:
    return bool(args.get("stream"))


def stream_form(path: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from ..calls import as_stream

    return path, as_stream("anthropic", "messages.create", args)


async def authorize(sdk: Any, request: Any) -> None:
    """The API key (`x-api-key`, and `api-key`) or an Entra ID token, from the SDK's own per-request hook."""
    from anthropic._models import FinalRequestOptions

    await prepared_headers(sdk, request, FinalRequestOptions)
