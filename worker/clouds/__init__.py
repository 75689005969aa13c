"""The cloud kinds in a worker: the SDKs' own cloud clients, built from a profile's settings.

A profile of kind `bedrock` or `vertex` runs on anthropic's AsyncAnthropicBedrock or
AsyncAnthropicVertex, one of kind `azure` on openai's AsyncAzureOpenAI: the SDK rewrites the path
and body and authenticates each request (SigV4, a Google token, an api-key or an Entra ID token)
in its own hooks, so a request retried in a new worker is signed afresh there. Credentials come
from the cloud's usual chain in the worker's environment, never from the caller or the broker.
One module per kind (`build`, `preload`); the first-party kinds build their plain client here too.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType
from typing import Any

import msgspec

from broker.config import Profile
from broker.errors import ConfigError
from broker.extras import missing
from broker.protocol import HttpCall

from ..calls import BadCall, json_body

FIRST_PARTY = ("anthropic", "openai")
STAND_IN = "isopool"  # broker/shim/transport.py's STAND_IN_KEY: a shim client named no region, project or api-version
_ENC = msgspec.json.Encoder()
# The credential libraries' loggers, whose DEBUG records can hold credentials (botocore logs each
# canonical request, the AWS session token in it): never below INFO, whatever the pool's log level.
_CREDENTIAL_LOGGERS = ("botocore", "boto3", "google.auth", "azure.identity", "azure.core")


def _module(kind: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{kind}")


def build(sdk: Any, profile: Profile, key: str | None, **common: Any) -> Any:
    """The async client of the profile's kind; a ConfigError saying what is missing (an extra, a region)."""
    if profile.kind in FIRST_PARTY:
        return sdk.client(api_key=key, base_url=profile.base_url, **common)
    if lacking := missing(profile.kind, profile.auth):
        raise ConfigError(lacking)
    for name in _CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger(name).getEffectiveLevel()))
    try:
        return _module(profile.kind).build(sdk.module, profile, key, **common)
    except (ValueError, RuntimeError, OSError) as exc:  # no region, an unreadable credentials file, ...
        raise ConfigError(f"profile kind {profile.kind}: {exc}") from None


def preload(kinds: tuple[str, ...]) -> None:
    """Import what the cloud kinds' first requests would (in the zygote, so that no worker pays for it)."""
    for kind in kinds:
        if kind not in FIRST_PARTY and not missing(kind):
            _module(kind).preload()


def relay(kind: str) -> ModuleType | None:
    """How a raw HTTP request of a cloud kind is relayed (its endpoints, stream form and per-attempt
    `authorize`); None for the first-party kinds, whose credentials are static headers."""
    return None if kind in FIRST_PARTY else _module(kind)


async def messages_in_cloud_form(sdk: Any, call: HttpCall) -> HttpCall:
    """A first-party `POST /v1/messages` in an Anthropic cloud's form, by the SDK's own rules (its
    `_prepare_options`: model and stream into the path, anthropic_version and betas into the body,
    the profile's region and project); any other request as it is (already in the cloud's form)."""
    if call.method != "POST" or call.path not in ("/v1/messages", "/v1/messages?beta=true"):
        return call
    from anthropic._models import FinalRequestOptions

    betas = {k: v for k, v in call.headers if k.lower() == "anthropic-beta"}
    request = FinalRequestOptions.construct(method="post", url=call.path, json_data=json_body(call.body), headers=betas)
    try:
        options = await sdk._prepare_options(request)
    except ValueError as exc:  # e.g. no model
        raise BadCall(str(exc)) from None
    return msgspec.structs.replace(call, path=options.url, body=_ENC.encode(options.json_data))


# What a call's placement may set of its profile (a profile's other settings are the pool's alone).
PLACES = ("region", "project", "endpoint", "api_version", "base_url", "aws_profile")


def placed(profile: Profile, sdk: Any, placement: dict[str, str], allow_overrides: bool) -> Profile | None:
    """Where a cloud client's call goes (the shim's client named its region, project, endpoint or, where
    the pool allows overrides, base URL): None for the profile's own place; elsewhere, with
    allow_overrides, the profile moved there (a base_url it names stays: a VPC endpoint's region); else a
    BadCall naming both (data pinned to one region must not silently go to another). `sdk` None: the
    profile's own client could not be built (a dormant profile of the embedded pool, with no region or
    api-version in the environment), so with allow_overrides the call's placement completes it."""
    if profile.kind in FIRST_PARTY:
        return None
    if sdk is None:
        moved = {name: given for name, given in placement.items() if name in PLACES} if allow_overrides else {}
    else:
        own = _module(profile.kind).placement(sdk)
        moved = {name: given for name, given in placement.items() if name in own and given != own[name]}
    if not moved:
        return None
    if not allow_overrides:
        name, given = next(iter(moved.items()))
        raise BadCall(f"the client names {profile.kind} {name} {given!r}, but this profile sends to {own[name]!r}: "
                      f"drop it, or send to a profile of {name} {given!r} (pool_profile=NAME)")  # fmt: skip
    unplaced = {"base_url": None} if {"endpoint", "resource"} & set(moved) else {}  # they name the base URL
    return msgspec.structs.replace(profile, **{**unplaced, **moved})


def call_kwargs(profile: Profile, kwargs: dict[str, Any]) -> dict[str, Any]:
    """An SDK call's arguments for the profile's client: Azure's model names its deployment."""
    if profile.kind == "azure" and (deployment := profile.azure_deployments.get(kwargs.get("model", ""))):
        return {**kwargs, "model": deployment}
    return kwargs


async def prepared_headers(sdk: Any, request: Any, options_type: type) -> None:
    """The credentials the SDK's own per-request hook (`_prepare_options`: Azure's and Foundry's, which call
    an Entra ID token provider each time) puts on a request, set on `request`."""
    options = await sdk._prepare_options(options_type.construct(method=request.method.lower(), url=str(request.url),
                                                                headers={}))  # fmt: skip
    request.headers.update({k: v for k, v in options.headers.items() if isinstance(v, str)})


# The credential libraries' errors (looked up only if loaded: no other can have been raised), and the
# SDK's own when boto3 finds no AWS credentials: a worker without working credentials is misconfigured.
_CREDENTIAL_ERRORS = (
    ("botocore.exceptions", "BotoCoreError"),  # no credentials, no such profile, an unreadable config file
    ("google.auth.exceptions", "GoogleAuthError"),
    ("azure.core.exceptions", "ClientAuthenticationError"),
)


def is_credential_error(exc: BaseException) -> bool:
    if isinstance(exc, RuntimeError) and str(exc).startswith("Could not resolve AWS credentials"):
        return True
    loaded = (getattr(sys.modules[m], name) for m, name in _CREDENTIAL_ERRORS if m in sys.modules)
    return isinstance(exc, tuple(loaded))
