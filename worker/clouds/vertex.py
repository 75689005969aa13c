"""Claude on Google Vertex AI: anthropic's AsyncAnthropicVertex sends a Google OAuth access token,
refreshed by google-auth when it expires: from `credentials_file` (a service-account or other
credentials JSON), else Application Default Credentials; `api_key_env` names a ready access token
instead (not refreshed)."""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import Any

import msgspec

from broker.config import Profile
from broker.errors import ConfigError

from ..calls import BadCall
from . import STAND_IN

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
PROJECT_ENV = "ANTHROPIC_VERTEX_PROJECT_ID"  # the SDK's own variable


def build(module: Any, profile: Profile, key: str | None, **common: Any) -> Any:
    given: dict[str, Any] = {"region": profile.region, "project_id": profile.project, "access_token": key,
                             "base_url": profile.base_url}  # fmt: skip
    if key is None and (profile.credentials_file or not (profile.project or os.environ.get(PROJECT_ENV))):
        import google.auth

        if profile.credentials_file:
            credentials, project = google.auth.load_credentials_from_file(profile.credentials_file, scopes=[SCOPE])
        else:  # the SDK would need the project before it loads ADC (at a request's first hook): load it now
            credentials, project = google.auth.default(scopes=[SCOPE])
        given.update(credentials=credentials, project_id=profile.project or os.environ.get(PROJECT_ENV) or project)
    if not (given["project_id"] or os.environ.get(PROJECT_ENV)):
        raise ConfigError(f"profile kind vertex: no project: set `project` in the profile (or {PROJECT_ENV} where "
                          "the workers run), or use credentials that name one")  # fmt: skip
    return module.AsyncAnthropicVertex(**{k: v for k, v in given.items() if v is not None}, **common)


def preload() -> None:
    """google-auth and the `requests` transport its refresh uses (~120 ms)."""
    import google.auth  # noqa: F401
    import google.auth.transport.requests  # noqa: F401
    import google.oauth2.service_account  # noqa: F401


def placement(sdk: Any) -> dict[str, str | None]:
    return {"region": sdk.region, "project": sdk.project_id, "base_url": str(sdk.base_url).rstrip("/")}


# The raw-HTTP relay (worker/exchange.py): paths relative to the client's base URL (…/v1).
_PREDICT = re.compile(r"/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/[^/:]+:(stream)?[rR]awPredict")


# Vertex's path names the project and region the data goes to; the shim's stand-in means the profile's.
_PLACED = re.compile(r"/projects/([^/]+)/locations/([^/]+)/")


async def from_first_party(sdk: Any, call: Any, profile: Profile) -> Any:
    """`/v1/messages` (as an Anthropic client sends it) in this cloud's form, and a path in it placed in
    the profile's project and region: a stand-in takes the profile's; another project or region is
    refused (the pool's credentials never send a request's data somewhere its profile does not)."""
    from . import messages_in_cloud_form

    call = await messages_in_cloud_form(sdk, call)
    if (match := _PLACED.match(call.path)) is None:
        return call
    own = {"project": sdk.project_id, "region": sdk.region}
    for (name, profiles), given in zip(own.items(), match.groups(), strict=True):
        if given != STAND_IN and given != profiles:
            raise BadCall(f"the request names Vertex {name} {given!r}, but this profile sends to {profiles!r}: "
                          f"send it to a profile of {name} {given!r}")  # fmt: skip
    return msgspec.structs.replace(call, path=f"/projects/{own['project']}/locations/{own['region']}/"
                                   + call.path[match.end() :])  # fmt: skip


def with_model(path: str, model: str, profile: Profile) -> str:
    """The path naming `model` in place of its own; another path (count-tokens too) as it is."""
    if "/models/count-tokens:" in path:
        return path
    return _MODEL.sub(lambda m: m[1] + urllib.parse.quote(model, safe="@") + m[3], path, count=1)


_MODEL = re.compile(
    r"^(/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/)([^/]+)(:(?:stream)?[rR]awPredict)"
)


def method_of(route: str) -> str | None:
    return "messages.create" if _PREDICT.fullmatch(route) and "/models/count-tokens:" not in route else None


def streams(route: str, args: dict[str, Any]) -> bool:
    return bool(args.get("stream"))


def stream_form(path: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return path.replace(":rawPredict", ":streamRawPredict", 1), {**args, "stream": True}


async def authorize(sdk: Any, request: Any) -> None:
    """The access token, refreshed by google-auth if it expired (a fresh worker fetches its own)."""
    await sdk._prepare_request(request)
