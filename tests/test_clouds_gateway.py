"""The gateway's cloud-form routes (issue 20, step 7): each SDK's own cloud class pointed at the gateway
(Bedrock's `/model/{m}/invoke[-with-response-stream]` answered in AWS event-stream frames, Vertex's
`:rawPredict`/`:streamRawPredict`, Azure's `/openai/deployments/{d}/chat/completions`) gets the answer
the pool's profile of that kind gives; its token is the gateway's (`api-key` for Azure)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from broker.config import Settings
from broker.http.gateway import Gateway, Refused

from .cloudkit import AZURE_VERSION, MODELS, ask, clouds_pool, needs_clouds
from .conftest import TEST_SETTINGS

pytestmark = [needs_clouds, pytest.mark.xdist_group(__name__)]  # its module-scoped pool on one worker

KINDS = ["bedrock", "vertex", "azure"]
METHOD = {"bedrock": "messages.create", "vertex": "messages.create", "azure": "chat.completions.create"}


@pytest.fixture(scope="module")
def clouds(fake, tmp_path_factory):
    with clouds_pool(fake.url, tmp_path_factory.mktemp("gcp"), only=tuple(KINDS), http="127.0.0.1:0",
                     **TEST_SETTINGS) as pool:  # fmt: skip
        yield pool


def at_gateway(kind: str, url: str, **extra: Any) -> Any:
    """The SDK's own cloud class pointed at the gateway, with a bearer key (else Bedrock's SigV4-signs
    with the caller's own AWS credentials) and the stand-in project (the profile's)."""
    import anthropic
    import openai

    if kind == "bedrock":
        return anthropic.AnthropicBedrock(base_url=url, aws_region="us-east-1", api_key="token", max_retries=0, **extra)
    if kind == "vertex":
        return anthropic.AnthropicVertex(base_url=url + "/v1", region="us-east5", project_id="isopool",
                                         access_token="token", max_retries=0, **extra)  # fmt: skip
    return openai.AzureOpenAI(azure_endpoint=url, api_version=AZURE_VERSION, api_key="token", max_retries=0, **extra)


def _pool_answer(clouds, kind: str) -> str:
    args: dict[str, Any] = {"model": MODELS[kind], "messages": [{"role": "user", "content": "hello cloud"}]}
    with clouds.client() as client:
        body = client.request(kind, METHOD[kind], **args, **({} if kind == "azure" else {"max_tokens": 32})).json()
    return body["choices"][0]["message"]["content"] if kind == "azure" else body["content"][0]["text"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_sdks_own_cloud_class_pointed_at_the_gateway_gets_the_pools_answer(clouds, fake, kind):
    sdk = at_gateway(kind, clouds.http_url)
    before = fake.stats()["served"]
    plain, streamed = ask(sdk, kind, False, MODELS[kind]), ask(sdk, kind, True, MODELS[kind])
    assert plain == streamed == _pool_answer(clouds, kind)
    if kind == "bedrock":  # signed by the worker (the caller sent a bearer token the gateway dropped)
        assert fake.stats()["signatures"][-1]["verified"]
        assert fake.stats()["served"].get("bedrock.bearer", 0) == before.get("bedrock.bearer", 0)


def test_a_bedrock_stream_broken_after_output_ends_in_an_exception_frame(clouds):
    import anthropic

    sdk = at_gateway("bedrock", clouds.http_url, default_headers={"x-isopool-fault": "reset:after=5"})
    events = []
    with pytest.raises(anthropic.APIStatusError, match="isopool") as caught:
        with sdk.messages.stream(model=MODELS["bedrock"], max_tokens=32, messages=[{"role": "user", "content": "x"}]) \
                as stream:  # fmt: skip
            events.extend(stream)
    assert events and caught.value.body["error"]["type"] == "internalServerException"


def test_the_gateways_own_bedrock_errors_are_in_bedrocks_shape(clouds):
    import anthropic

    sdk = at_gateway("bedrock", clouds.http_url, default_headers={"x-isopool-profile": "no-such-profile"})
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(model=MODELS["bedrock"], max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert caught.value.response.headers["x-amzn-errortype"].startswith("ValidationException:")
    assert "no-such-profile" in caught.value.body["message"]


@pytest.mark.parametrize(
    "headers, accepted",
    [({"api-key": "tok"}, True), ({"authorization": "Bearer tok"}, True), ({"x-api-key": "tok"}, True),
     ({"authorization": "bearer tok"}, True), ({"authorization": "BEARER  tok"}, True),
     ({"authorization": "Basic tok"}, False), ({"api-key": "wrong"}, False), ({}, False),
     ({"x-api-key": "Bearer tok"}, False)],  # a key header is the key as it is: Bearer belongs to Authorization
)  # fmt: skip
def test_the_gateway_token_is_read_from_any_key_header_and_bearer_in_any_case(headers, accepted):
    gateway = Gateway(None, Settings(), token="tok")  # type: ignore[arg-type]
    request = make_mocked_request("POST", "/openai/deployments/d/chat/completions", headers=headers)
    if accepted:
        gateway.check_token(request)
    else:
        with pytest.raises(Refused, match="api-key"):
            gateway.check_token(request)


def test_a_bedrock_model_arn_reaches_the_bedrock_profile_with_its_slash_encoded(clouds, fake):
    """An inference profile's ARN has a `/`, which the SDK sends as `%2F`: matched decoded, the request once
    missed the Bedrock route and went to the OpenAI family's profile with its key."""
    arn = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5f6"
    before = fake.stats()["served"]
    answer = ask(at_gateway("bedrock", clouds.http_url), "bedrock", False, arn)
    served = fake.stats()["served"]
    assert answer and sum(served.values()) == sum(before.values()) + 1
    assert [k for k in served if served[k] != before.get(k)][0].startswith("bedrock")


@pytest.mark.parametrize(
    "path, refused",
    [("/v1/projects/p/locations/us-east5/publishers/google/models/gemini-pro:streamGenerateContent", False),
     ("/model/m/invoke?X-Amz-Security-Token=forged", True),
     ("/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude:rawPredict?key=forged", True)],
)  # fmt: skip
def test_only_anthropics_vertex_models_and_no_forged_queries_take_a_cloud_route(path, refused):
    """Vertex's route is Anthropic's publisher only (another goes the first-party way, under the OpenAI
    profile's base URL, where it is nothing); Bedrock and Vertex take no query, which the workers would sign."""
    gateway = Gateway(None, Settings(), token=None)  # type: ignore[arg-type]
    request = make_mocked_request("POST", path)
    kind = gateway.route(request)[1]
    assert kind == ("openai" if "google" in path else "bedrock" if "/model/" in path else "vertex")
    from broker.http import cloudforms

    assert (cloudforms.query_problem(kind, request.raw_path) is not None) == refused
