"""What the cloud kinds lacked after issue 20's first steps (step 9): a fallback to another model on a
request in a cloud's own form (the model is in the path there, and Bedrock and Vertex refuse one in
the body), a context-length 400 in Bedrock's shape recognised for `context_fallback`, prefill
continuation of a stream broken after output, the first-party routes' default profile by family, and
a Vertex profile with no project a configuration error naming `project`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from broker.config import load_settings
from broker.errors import ConfigError
from broker.protocol import Code, HttpCall
from worker.errors import translate
from worker.fallback import failure_of

from .cloudkit import BACKUP, MODELS, clouds_pool, needs_clouds, service_account
from .conftest import TEST_SETTINGS, fault

pytestmark = [needs_clouds, pytest.mark.xdist_group(__name__)]  # its module-scoped pool on one worker

KINDS = ["bedrock", "vertex"]
PROMPT = [{"role": "user", "content": "rescue me"}]


@pytest.fixture(scope="module")
def rescue(fake, tmp_path_factory):
    with clouds_pool(fake.url, tmp_path_factory.mktemp("gcp"), only=("bedrock-rescue", "vertex-rescue"),
                     **TEST_SETTINGS) as pool, pool.client() as client:  # fmt: skip
        yield client


def _cloud_form(kind: str, model: str, stream: bool = False) -> HttpCall:
    """The request as the SDK's own cloud class builds it (model in the path)."""
    from anthropic._models import FinalRequestOptions

    from .cloudkit import cloud_client

    args = {"model": model, "max_tokens": 32, "messages": PROMPT, "stream": stream}
    with cloud_client(kind, "http://unused", Path(tempfile.mkdtemp()), sync=True) as sdk:
        options = sdk._prepare_options(FinalRequestOptions.construct(method="post", url="/v1/messages",
                                                                     json_data=args))  # fmt: skip
    return HttpCall("POST", options.url, [("content-type", "application/json")], json.dumps(options.json_data).encode())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("down", ["unavailable:for=600", "context-length"], ids=["fallback", "context"])
def test_a_request_in_a_clouds_form_falls_back_to_another_model_in_its_path(rescue, kind, down):
    call = rescue.submit_http(f"{kind}-rescue", _cloud_form(kind, f"{MODELS[kind]}@{down}"))
    answer = call.result()
    assert answer.status == 200, answer.body
    assert answer.json()["model"] == BACKUP[kind] and call.served.model == BACKUP[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_a_cloud_stream_broken_after_output_is_continued_by_prefill(rescue, kind):
    args = {"model": MODELS[kind], "max_tokens": 32, "messages": PROMPT}
    call = rescue.submit(f"{kind}-rescue", "messages.create", stream=True, **args, **fault("reset:after=8"))
    events = [e.json() for e in call]
    text = "".join(e["delta"].get("text", "") for e in events if e.get("type") == "content_block_delta")
    whole = rescue.request(f"{kind}-rescue", "messages.create", **args).json()["content"][0]["text"]
    assert call.served.rescue == "prefill" and text == whole


def test_bedrocks_context_length_400_is_recognised():
    bedrock = json.dumps({"message": "prompt is too long: 250000 tokens > 200000 maximum"}).encode()
    assert failure_of(400, bedrock) == "context_length"
    assert failure_of(400, b'{"message": "Input is too long for requested model."}') == "context_length"
    assert failure_of(400, b'{"message": "malformed input request"}') == "" == failure_of(429, bedrock)


def test_the_first_party_default_profile_is_the_first_of_the_family_where_none_is_of_the_kind():
    settings = load_settings(env={}, profiles={"azure": {"kind": "azure", "endpoint": "https://r.openai.azure.com"},
                                  "bedrock": {"kind": "bedrock", "region": "us-east-1"},
                                  "openai": {"kind": "openai"}})  # fmt: skip
    assert settings.default_profile("anthropic") == "bedrock"
    assert settings.default_profile("openai") == "openai"  # its name (and kind) still win
    assert settings.default_profile("vertex") == ""


def test_a_vertex_profile_with_no_project_is_a_config_error_naming_project(monkeypatch, tmp_path):
    from worker import clouds, sdks

    account = json.loads(service_account(tmp_path, "http://unused").read_text())
    (tmp_path / "adc.json").write_text(json.dumps({k: v for k, v in account.items() if k != "project_id"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "adc.json"))
    for name in ("ANTHROPIC_VERTEX_PROJECT_ID", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    profile = load_settings(env={}, profiles={"v": {"kind": "vertex", "region": "us-east5"}}).profiles["v"]
    with pytest.raises(ConfigError, match="no project: set `project` in the profile") as caught:
        clouds.build(sdks.load("anthropic"), profile, None)
    assert translate(caught.value).code == Code.CONFIG
