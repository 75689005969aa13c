"""A load test through a cloud profile (`--cloud bedrock|vertex|azure`): the requests are the
first-party ones (`/v1/messages`, `/chat/completions`), which the workers put in the cloud's form and
sign as they would any call (worker/exchange.py `signed`), so the figures include the signing.

Against the built-in fake (its cloud routes) or `--target URL` (that endpoint, e.g. a VPC endpoint),
the rest comes from the workers' environment as for any cloud profile: AWS credentials (any key pair
for the fake: it checks a signature's form) and AWS_REGION, CLOUD_ML_REGION and
ANTHROPIC_VERTEX_PROJECT_ID with a token (`--api-key-env`) or Application Default Credentials,
AZURE_OPENAI_ENDPOINT and OPENAI_API_VERSION with a key. The fake needs none of the places.
"""

from __future__ import annotations

from typing import Any

CLOUDS = {"bedrock": "messages", "vertex": "messages", "azure": "chat"}  # the API each speaks
# Where the fake serves each cloud, and the places it takes in lieu of the environment's.
_FAKE = {
    "bedrock": lambda url: {"base_url": url, "region": "us-east-1"},
    "vertex": lambda url: {"base_url": url + "/v1", "region": "us-east5", "project": "isopool-loadtest"},
    "azure": lambda url: {"endpoint": url, "api_version": "2024-10-21"},
}


def cloud_profile(cloud: str, fake_url: str, target: str) -> dict[str, Any]:
    """The profile's settings for `cloud` at the fake (`fake_url`) or at the endpoint `target`."""
    if fake_url:
        return {"kind": cloud, **_FAKE[cloud](fake_url)}
    where = {"azure": "endpoint"}.get(cloud, "base_url")
    return {"kind": cloud, **({where: target.rstrip("/")} if target.startswith("http") else {})}
