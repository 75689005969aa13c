"""GPT on Azure OpenAI: openai's AsyncAzureOpenAI, with the profile's endpoint and api-version, and
an `api-key` (`api_key_env`, else AZURE_OPENAI_API_KEY) or, with `auth = "entra"`, an Entra ID token
from azure-identity's DefaultAzureCredential (environment, workload or managed identity, Azure CLI),
asked for on every request by the SDK's token provider."""

from __future__ import annotations

import importlib.util
from typing import Any

from broker.config import Profile

SCOPE = "https://cognitiveservices.azure.com/.default"


def build(module: Any, profile: Profile, key: str | None, **common: Any) -> Any:
    given: dict[str, Any] = {"api_version": profile.api_version, "base_url": profile.base_url}
    given["azure_endpoint"] = None if profile.base_url else profile.endpoint
    if profile.auth == "entra":
        from azure.identity.aio import DefaultAzureCredential, get_bearer_token_provider

        given["azure_ad_token_provider"] = get_bearer_token_provider(DefaultAzureCredential(), SCOPE)
    else:
        given["api_key"] = key
    return module.AsyncAzureOpenAI(**{k: v for k, v in given.items() if v is not None}, **common)


def preload() -> None:
    """azure-identity's async credentials (~150 ms), when installed (an api-key needs none)."""
    if importlib.util.find_spec("azure.identity") is not None:
        import azure.identity.aio  # noqa: F401
