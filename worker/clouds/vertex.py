"""Claude on Google Vertex AI: anthropic's AsyncAnthropicVertex sends a Google OAuth access token,
refreshed by google-auth when it expires: from `credentials_file` (a service-account or other
credentials JSON), else Application Default Credentials; `api_key_env` names a ready access token
instead (not refreshed)."""

from __future__ import annotations

import re
from typing import Any

from broker.config import Profile

SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def build(module: Any, profile: Profile, key: str | None, **common: Any) -> Any:
    given: dict[str, Any] = {"region": profile.region, "project_id": profile.project, "access_token": key,
                             "base_url": profile.base_url}  # fmt: skip
    if profile.credentials_file and key is None:
        import google.auth

        credentials, project = google.auth.load_credentials_from_file(profile.credentials_file, scopes=[SCOPE])
        given.update(credentials=credentials, project_id=profile.project or project)
    return module.AsyncAnthropicVertex(**{k: v for k, v in given.items() if v is not None}, **common)


def preload() -> None:
    """google-auth and the `requests` transport its refresh uses (~120 ms)."""
    import google.auth  # noqa: F401
    import google.auth.transport.requests  # noqa: F401
    import google.oauth2.service_account  # noqa: F401


# The raw-HTTP relay (worker/exchange.py): paths relative to the client's base URL (…/v1).
_PREDICT = re.compile(r"/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/[^/:]+:(stream)?[rR]awPredict")


async def from_first_party(sdk: Any, call: Any, profile: Profile) -> Any:
    """`/v1/messages` (as an Anthropic client sends it) in this cloud's form; anything else as it is."""
    from . import messages_in_cloud_form

    return await messages_in_cloud_form(sdk, call)


def method_of(route: str) -> str | None:
    return "messages.create" if _PREDICT.fullmatch(route) and "/models/count-tokens:" not in route else None


def streams(route: str, args: dict[str, Any]) -> bool:
    return bool(args.get("stream"))


def stream_form(path: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return path.replace(":rawPredict", ":streamRawPredict", 1), {**args, "stream": True}


async def authorize(sdk: Any, request: Any) -> None:
    """The access token, refreshed by google-auth if it expired (a fresh worker fetches its own)."""
    await sdk._prepare_request(request)
