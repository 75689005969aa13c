"""GPT on Azure OpenAI: openai's AsyncAzureOpenAI, with the profile's endpoint and api-version, and
an `api-key` (`api_key_env`, else AZURE_OPENAI_API_KEY) or, with `auth = "entra"`, an Entra ID token
from azure-identity's DefaultAzureCredential (environment, workload or managed identity, Azure CLI),
asked for on every request by the SDK's token provider."""

from __future__ import annotations

import contextlib
import re
import urllib.parse
from typing import Any

import msgspec

from broker.config import Profile

from ..calls import BadCall, json_body
from . import STAND_IN, prepared_headers

_ENC = msgspec.json.Encoder()

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
    """azure-identity's async credentials (~150 ms), when installed (an api-key needs none; without the
    `azure` package at all, find_spec raised and the zygote died at every start)."""
    with contextlib.suppress(ImportError):
        import azure.identity.aio  # noqa: F401


def placement(sdk: Any) -> dict[str, str | None]:
    return {"endpoint": str(sdk._azure_endpoint).rstrip("/") if sdk._azure_endpoint else None}


# The raw-HTTP relay (worker/exchange.py): paths relative to the client's base URL ({endpoint}/openai).
_CHAT = re.compile(r"/deployments/[^/]+/chat/completions")


async def from_first_party(sdk: Any, call: Any, profile: Profile) -> Any:
    """`/chat/completions` (as an OpenAI client sends it, under its /v1) to the deployment of its model
    (`azure_deployments`, else the model's own name), which also becomes the body's model, as with SDK
    calls; `/responses` is the same path on Azure."""
    route, sep, query = call.path.partition("?")
    if call.method != "POST" or route != "/chat/completions":
        return call
    args = json_body(call.body)
    model = str(args.get("model", ""))
    deployment = profile.azure_deployments.get(model, model)
    if not deployment:
        raise BadCall("a chat completion for Azure needs a model: it names the deployment")
    path = f"/deployments/{urllib.parse.quote(deployment, safe='')}{route}{sep}{query}"
    return msgspec.structs.replace(call, path=path, body=_ENC.encode({**args, "model": deployment}))


def with_model(path: str, model: str, profile: Profile) -> str:
    """The path to the deployment of `model` (`azure_deployments`, else its own name) in place of its own."""
    deployment = urllib.parse.quote(profile.azure_deployments.get(model, model), safe="")
    return _DEPLOYMENT.sub(lambda m: m[1] + deployment, path, count=1)


_DEPLOYMENT = re.compile(r"^(/deployments/)([^/]+)")


def method_of(route: str) -> str | None:
    if _CHAT.fullmatch(route):
        return "chat.completions.create"
    return "responses.create" if route == "/responses" else None


def streams(route: str, args: dict[str, Any]) -> bool:
    return bool(args.get("stream"))


def stream_form(path: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from ..calls import as_stream

    return path, as_stream("openai", method_of(path.partition("?")[0]) or "", args)


async def authorize(sdk: Any, request: Any) -> None:
    """The profile's api-version where the caller named none (or the shim's stand-in), then the api-key
    or an Entra ID token from the SDK's own per-request hook (which calls the token provider)."""
    if request.url.params.get("api-version") in (None, STAND_IN):  # the shim's stand-in: the profile's
        request.url = request.url.copy_merge_params({"api-version": sdk._api_version})
    from openai._models import FinalRequestOptions

    await prepared_headers(sdk, request, FinalRequestOptions)
