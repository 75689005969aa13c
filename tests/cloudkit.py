"""What the cloud tests share: the skip when a cloud's extra is not installed, and each SDK's own
cloud client pointed at the fake provider with credentials the fake checks for real."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import Pool
from broker.extras import missing
from broker.fake_provider.clouds import TEST_AWS_KEY

_LACKING = "; ".join(filter(None, (missing("bedrock"), missing("vertex"), missing("azure", "entra"))))
needs_clouds = pytest.mark.skipif(bool(_LACKING), reason=f"the cloud extras are not installed ({_LACKING})")

AZURE_VERSION = "2024-10-21"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
PROMPT = [{"role": "user", "content": "hello cloud"}]
MODELS = {"bedrock": "anthropic.claude-fake-v1:0", "vertex": "claude-fake", "azure": "gpt-fake"}
__all__ = ["AZURE_VERSION", "BACKUP", "MODELS", "PROMPT", "TEST_AWS_KEY", "ask", "ask_async", "cloud_client",
           "clouds_pool", "needs_clouds", "service_account", "text"]  # fmt: skip


@functools.cache
def _private_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()  # fmt: skip


def service_account(tmp_path: Path, fake_url: str) -> Path:
    """A Google service-account file whose token endpoint is the fake's: google-auth signs a JWT with
    its key and exchanges it there for an access token, as it would at oauth2.googleapis.com."""
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "proj-test", "private_key_id": "k1", "private_key": _private_key(),
        "client_email": "pool@proj-test.iam.gserviceaccount.com", "client_id": "1", "token_uri": fake_url + "/token",
    }))  # fmt: skip
    return path


def cloud_client(kind: str, fake_url: str, tmp_path: Path, sync: bool) -> Any:
    """The SDK's own client of `kind` (bedrock, vertex, azure, azure-entra) for the fake, sync or async."""
    import anthropic
    import openai

    prefix = "" if sync else "Async"
    if kind == "bedrock":
        return getattr(anthropic, f"{prefix}AnthropicBedrock")(
            aws_access_key=TEST_AWS_KEY[0], aws_secret_key=TEST_AWS_KEY[1], aws_region="us-east-1",
            base_url=fake_url, max_retries=0)  # fmt: skip
    if kind == "vertex":
        from google.oauth2 import service_account as google

        credentials = google.Credentials.from_service_account_file(service_account(tmp_path, fake_url), scopes=[SCOPE])
        return getattr(anthropic, f"{prefix}AnthropicVertex")(
            region="us-east5", project_id="proj-test", credentials=credentials, base_url=fake_url + "/v1",
            max_retries=0)  # fmt: skip
    auth: dict[str, Any] = {"api_key": "azure-test-key"}
    if kind == "azure-entra":  # the token provider is called per request (a sync one serves the async client too)
        from azure.identity import DefaultAzureCredential, get_bearer_token_provider

        scope = "https://cognitiveservices.azure.com/.default"
        auth = {"azure_ad_token_provider": get_bearer_token_provider(DefaultAzureCredential(), scope)}
    return getattr(openai, f"{prefix}AzureOpenAI")(azure_endpoint=fake_url, api_version=AZURE_VERSION, max_retries=0,
                                                   **auth)  # fmt: skip


def text(kind: str, answer: Any) -> str:
    return answer.choices[0].message.content if kind.startswith("azure") else answer.content[0].text


def ask(client: Any, kind: str, stream: bool, model: str, messages: list | None = None) -> str:
    """The answer's text to `messages` (PROMPT) through a sync SDK client, streamed or not."""
    messages = messages or PROMPT
    if kind.startswith("azure"):
        if not stream:
            return text(kind, client.chat.completions.create(model=model, messages=messages))
        chunks = client.chat.completions.create(model=model, messages=messages, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if not stream:
        return text(kind, client.messages.create(model=model, max_tokens=32, messages=messages))
    with client.messages.stream(model=model, max_tokens=32, messages=messages) as events:
        return text(kind, events.get_final_message())


async def ask_async(client: Any, kind: str, stream: bool, model: str) -> str:
    """The answer's text to PROMPT through an async SDK client, streamed or not."""
    if kind.startswith("azure"):
        if not stream:
            return text(kind, await client.chat.completions.create(model=model, messages=PROMPT))
        chunks = await client.chat.completions.create(model=model, messages=PROMPT, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    if not stream:
        return text(kind, await client.messages.create(model=model, max_tokens=32, messages=PROMPT))
    async with client.messages.stream(model=model, max_tokens=32, messages=PROMPT) as events:
        return text(kind, await events.get_final_message())


def cloud_profiles(url: str, credentials: str) -> dict:
    one = {"min_workers": 1, "spare_workers": 0, "max_workers": 2}
    none = {"min_workers": 0, "spare_workers": 0}  # misconfigured or seldom used: workers only when asked
    azure = {"kind": "azure", "endpoint": url, "api_version": AZURE_VERSION}
    return {
        "bedrock": {"kind": "bedrock", "region": "us-east-1", "base_url": url, **one},
        "vertex": {"kind": "vertex", "region": "us-east5", "base_url": f"{url}/v1", "credentials_file": credentials,
                   **one},
        "azure": {**azure, "api_key_env": "TEST_AZURE_KEY", "azure_deployments": {"gpt-4o": "gpt-fake"}, **one},
        "azure-entra": {**azure, "auth": "entra", **none},
        "bedrock-no-profile": {"kind": "bedrock", "region": "us-east-1", "base_url": url,
                               "aws_profile": "no-such-profile", **none},
        "vertex-no-file": {"kind": "vertex", "region": "us-east5", "base_url": f"{url}/v1",
                           "credentials_file": "/nonexistent/service-account.json", **none},
        "bedrock-rescue": {**_rescue("bedrock"), "region": "us-east-1", "base_url": url},
        "vertex-rescue": {**_rescue("vertex"), "region": "us-east5", "base_url": f"{url}/v1",
                          "credentials_file": credentials},
    }  # fmt: skip


def _rescue(kind: str) -> dict:
    """Another model when the primary cannot answer, or its prompt is over the context window; prefill
    continuation of a stream broken after output."""
    return {
        "kind": kind,
        "min_workers": 0,
        "spare_workers": 0,
        "max_workers": 2,
        "continue_streams": ["prefill"],
        "fallbacks": [{"model": BACKUP[kind]}],
        "context_fallback": {"model": BACKUP[kind]},
    }


BACKUP = {"bedrock": "anthropic.claude-backup-v1:0", "vertex": "claude-backup"}


@contextlib.contextmanager
def clouds_pool(fake_url: str, tmp_path: Path, only: tuple[str, ...] = (), **settings: Any) -> Iterator[Pool]:
    """A pool of the three cloud kinds (or `only` those profiles); the credentials are in the workers'
    environment only."""
    credentials = service_account(tmp_path, fake_url)
    profiles = cloud_profiles(fake_url, str(credentials))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", TEST_AWS_KEY[0])
        env.setenv("AWS_SECRET_ACCESS_KEY", TEST_AWS_KEY[1])
        for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):  # no developer's AWS files
            env.setenv(name, str(credentials.parent / "none"))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("TEST_AZURE_KEY", "azure-test-key")
        env.setenv("IDENTITY_ENDPOINT", fake_url + "/msi/token")
        env.setenv("IDENTITY_HEADER", "isopool-identity-header")
        with Pool(profiles={k: v for k, v in profiles.items() if not only or k in only}, **settings) as pool:
            yield pool
