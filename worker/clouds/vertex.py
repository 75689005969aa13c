"""Claude on Google Vertex AI: anthropic's AsyncAnthropicVertex sends a Google OAuth access token,
refreshed by google-auth when it expires: from `credentials_file` (a service-account or other
credentials JSON), else Application Default Credentials; `api_key_env` names a ready access token
instead (not refreshed)."""

from __future__ import annotations

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
