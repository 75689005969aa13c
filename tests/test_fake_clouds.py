"""The fake provider's cloud routes (issue 20, step 3), checked with the SDKs' own cloud clients:
AnthropicBedrock (SigV4 signed by botocore and verified by the fake, or a bearer API key),
AnthropicVertex (a real google-auth service-account refresh against the fake's /token), and
AzureOpenAI (an api-key, or a real azure-identity managed-identity token from the fake's
/msi/token), each sync and async, streamed or not. These are the oracle for the worker's adapters."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest

from .cloudkit import AZURE_VERSION, MODELS, PROMPT, TEST_AWS_KEY, ask, ask_async, cloud_client, needs_clouds

pytestmark = needs_clouds


def _answers(fake_url: str, kind: str, tmp_path, model: str = "") -> set[str]:
    """The text of each of sync/async x stream/plain: one answer, whichever way it was asked."""
    model = model or MODELS[kind]
    texts = set()
    for stream in (False, True):
        with cloud_client(kind, fake_url, tmp_path, sync=True) as client:
            texts.add(ask(client, kind, stream, model))

        async def run(stream=stream):
            async with cloud_client(kind, fake_url, tmp_path, sync=False) as client:  # closed: no ResourceWarning
                return await ask_async(client, kind, stream, model)

        texts.add(asyncio.run(run()))
    return texts


@pytest.mark.parametrize("kind", ["bedrock", "vertex", "azure"])
def test_each_sdk_cloud_client_gets_one_answer_sync_async_streamed_or_not(fake, kind, tmp_path):
    before = fake.stats()["served"]
    [text] = _answers(fake.url, kind, tmp_path)
    assert len(text.split()) > 3
    served = fake.stats()["served"]
    label = {"bedrock": "bedrock.messages", "vertex": "vertex.messages", "azure": "azure.chat.completions"}[kind]
    for way in ("stream", "plain"):  # the streams really streamed: the plain answers were not assembled from them
        assert served.get(f"{label}.{way}", 0) - before.get(f"{label}.{way}", 0) == 2
    if kind == "bedrock":
        assert fake.stats()["signatures"][-1]["verified"]  # botocore's signature, checked over what arrived
    if kind == "vertex":  # google-auth refreshed against the fake's token endpoint, once per client
        assert served["token.goog"] - before.get("token.goog", 0) == 4
    if kind == "azure":
        assert served["azure.deployment:gpt-fake"] - before.get("azure.deployment:gpt-fake", 0) == 4


def test_azure_with_entra_id_gets_its_token_from_the_managed_identity_endpoint(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("IDENTITY_ENDPOINT", fake.url + "/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "isopool-identity-header")
    before = fake.stats()["served"].get("token.entra", 0)
    [text] = _answers(fake.url, "azure-entra", tmp_path, model="gpt-fake")
    assert len(text.split()) > 3 and fake.stats()["served"]["token.entra"] > before


def test_a_wrong_signature_is_refused_and_a_bearer_key_is_taken(fake, tmp_path):
    import anthropic

    wrong = anthropic.AnthropicBedrock(aws_access_key=TEST_AWS_KEY[0], aws_secret_key="not-the-secret",
                                       aws_region="us-east-1", base_url=fake.url, max_retries=0)  # fmt: skip
    with pytest.raises(anthropic.PermissionDeniedError, match="signature we calculated does not match"):
        wrong.messages.create(model=MODELS["bedrock"], max_tokens=8, messages=PROMPT)
    bearer = anthropic.AnthropicBedrock(api_key="bedrock-api-key", aws_region="us-east-1", base_url=fake.url)
    assert bearer.messages.create(model=MODELS["bedrock"], max_tokens=8, messages=PROMPT).content[0].text


def _post(url: str, body: dict, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_each_cloud_refuses_what_the_cloud_refuses(fake):
    bedrock = fake.url + "/model/m/invoke"
    status, body = _post(bedrock, {"anthropic_version": "v", "stream": True}, {"authorization": "Bearer k"})
    assert (status, body) == (400, {"message": "Malformed input request: extraneous key [stream] is not permitted, "
                                    "please reformat your input and try again."})  # fmt: skip
    assert _post(bedrock, {"anthropic_version": "v"}, {})[0] == 403  # neither SigV4 nor a bearer key
    vertex = fake.url + "/v1/projects/p/locations/r/publishers/anthropic/models/claude-fake:rawPredict"
    assert _post(vertex, {"anthropic_version": "v"}, {"authorization": "Bearer goog-999999"})[0] == 401  # not issued
    azure = fake.url + "/openai/deployments/d/chat/completions"
    assert _post(azure, {"messages": PROMPT}, {"api-key": "k"}) == (404, {"error": {"code": "404",
                                                                   "message": "Resource not found"}})  # fmt: skip
    assert _post(azure + f"?api-version={AZURE_VERSION}", {"messages": PROMPT}, {})[0] == 401


@pytest.mark.parametrize(
    "kind, spec, error, status",
    [
        ("bedrock", "http-529", "ServiceUnavailableError", 503),  # Bedrock has no 529: ServiceUnavailableException
        ("vertex", "http-429", "RateLimitError", 429),
        ("azure", "content-filter", "BadRequestError", 400),
    ],
)
def test_faults_answer_in_each_clouds_error_shape(fake, tmp_path, kind, spec, error, status):
    with cloud_client(kind, fake.url, tmp_path, sync=True) as client:
        with pytest.raises(Exception) as caught:
            ask(client, kind, False, f"{MODELS[kind]}@{spec}")
    assert (type(caught.value).__name__, caught.value.status_code) == (error, status)
    response = caught.value.response
    if kind == "bedrock":
        assert response.headers["x-amzn-errortype"].startswith("ServiceUnavailableException:")
    if kind == "vertex":
        assert response.json()[0]["error"]["status"] == "RESOURCE_EXHAUSTED"
    if kind == "azure":
        assert response.json()["error"]["innererror"]["code"] == "ResponsibleAIPolicyViolation"


def test_a_bedrock_stream_breaks_as_a_first_party_one_does(fake, tmp_path):
    """A mid-stream error is an exception frame; a stall keeps sending `ping` chunks, which are no events."""
    import anthropic
    import httpx2

    from worker.frames import FrameSplitter

    with cloud_client("bedrock", fake.url, tmp_path, sync=True) as client:
        model = f"{MODELS['bedrock']}@error-event:after=3"
        with pytest.raises(anthropic.APIStatusError, match="serviceUnavailableException"):
            with client.messages.stream(model=model, max_tokens=32, messages=PROMPT) as events:
                events.get_final_message()
    model = urllib.parse.quote(f"{MODELS['bedrock']}@stall-ping:after=3,interval=0.05", safe=":;")
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 32, "messages": PROMPT}
    splitter, received, events = FrameSplitter(), 0, []
    url = f"{fake.url}/model/{model}/invoke-with-response-stream"
    with httpx2.stream("POST", url, json=body, headers={"authorization": "Bearer k"}) as response:
        assert response.headers["content-type"] == "application/vnd.amazon.eventstream"
        for chunk in response.iter_bytes():
            received += len(chunk)
            events += splitter.feed(chunk)
            if received > 2000:  # well past the three events: pings kept coming
                break
    assert [name for name, _ in events] == ["message_start", "content_block_start"]  # the third was a ping
