"""The shim's cloud classes (issue 20, step 6): `broker.shim.anthropic.AnthropicBedrock`, `AnthropicVertex`
and `broker.shim.openai.AzureOpenAI`, sync and async, give the answers the SDKs' own cloud classes give
against the same fake, while the caller's process holds no cloud credential and never signs (no
botocore, no google-auth imported); a region, project or endpoint the caller names that is not its
profile's is refused unless the pool allows overrides."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from broker.shim import anthropic as shim_anthropic
from broker.shim import openai as shim_openai

from .cloudkit import AZURE_VERSION, MODELS, ask, ask_async, cloud_client, clouds_pool, needs_clouds
from .conftest import TEST_SETTINGS

pytestmark = [needs_clouds, pytest.mark.xdist_group(__name__)]  # its module-scoped pool on one worker

KINDS = ["bedrock", "vertex", "azure"]
CLASS = {"bedrock": (shim_anthropic, "AnthropicBedrock"), "vertex": (shim_anthropic, "AnthropicVertex"),
         "azure": (shim_openai, "AzureOpenAI")}  # fmt: skip
# What a caller's code passes its cloud class: the profile's own placement, or none at all (the profile's)
PLACED = {"bedrock": {"aws_region": "us-east-1"}, "vertex": {"region": "us-east5", "project_id": "proj-test"},
          "azure": {"api_version": AZURE_VERSION}}  # fmt: skip


@pytest.fixture(scope="module")
def clouds(fake, tmp_path_factory):
    with clouds_pool(fake.url, tmp_path_factory.mktemp("gcp"), **TEST_SETTINGS) as pool:
        yield pool


def shim_client(kind: str, pool: Any, sync: bool, **kwargs: Any) -> Any:
    module, name = CLASS[kind]
    return getattr(module, name if sync else f"Async{name}")(pool=pool, **kwargs)


def answer(client: Any, kind: str, sync: bool, stream: bool) -> str:
    if sync:
        return ask(client, kind, stream, MODELS[kind])
    return asyncio.run(ask_async(client, kind, stream, MODELS[kind]))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_shim_cloud_class_answers_as_the_sdks_own_cloud_class(clouds, fake, tmp_path, kind, sync, stream):
    shim = shim_client(kind, clouds, sync, **PLACED[kind])
    own = cloud_client(kind, fake.url, tmp_path, sync)
    assert isinstance(shim, type(own))
    assert answer(shim, kind, sync, stream) == answer(own, kind, sync, stream)


@pytest.mark.parametrize("kind", KINDS)
def test_a_shim_cloud_client_without_placement_takes_its_profiles_and_with_options_keeps_the_pool(clouds, kind):
    shim = shim_client(kind, clouds, True)  # no region, project or api-version: the stand-ins
    with clouds.client() as client:
        before = client.stats()["requests"].get("ok", 0)
        copied = shim.with_options(timeout=30, max_retries=1)
        assert ask(copied, kind, True, MODELS[kind]) == ask(shim, kind, False, MODELS[kind])
        assert client.stats()["requests"].get("ok", 0) == before + 2  # both through the pool


_CALLER = textwrap.dedent(
    """
    import sys
    from broker.shim import anthropic, openai

    bedrock = anthropic.AnthropicBedrock(aws_region="us-east-1")
    vertex = anthropic.AnthropicVertex(region="us-east5", project_id="proj-test")
    azure = openai.AzureOpenAI(api_version=sys.argv[1])
    prompt = [{"role": "user", "content": "who signs"}]
    for client, model in ((bedrock, sys.argv[2]), (vertex, sys.argv[3])):
        with client.messages.stream(model=model, max_tokens=16, messages=prompt) as events:
            print(events.get_final_message().content[0].text)
    print(azure.chat.completions.create(model=sys.argv[4], messages=prompt).choices[0].message.content)
    loaded = [m for m in ("botocore", "boto3", "google.auth", "azure.identity") if m in sys.modules]
    print("loaded:", loaded)
    """
)


def test_the_callers_process_never_signs_nor_imports_the_cloud_libraries(clouds, tmp_path):
    """The caller's environment has no cloud credentials at all: the workers sign (a fresh process)."""
    script = tmp_path / "caller.py"
    script.write_text(_CALLER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "AZURE_"))}
    env |= {"ISOPOOL_URL": clouds.url}
    args = [AZURE_VERSION, MODELS["bedrock"], MODELS["vertex"], MODELS["azure"]]
    out = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4 and all(lines[:3]) and lines[3] == "loaded: []"


@pytest.mark.parametrize(
    "kind, given, says",
    [("bedrock", {"aws_region": "eu-west-1"}, "region 'eu-west-1', but this profile sends to 'us-east-1'"),
     ("vertex", {"region": "europe-west1", "project_id": "proj-test"}, "region 'europe-west1'.*'us-east5'"),
     ("vertex", {"region": "us-east5", "project_id": "other"}, "project 'other'.*'proj-test'"),
     ("azure", {"azure_endpoint": "https://elsewhere.openai.azure.com", "api_version": AZURE_VERSION},
      "endpoint 'https://elsewhere.openai.azure.com', but this profile sends to 'http://127")],
)  # fmt: skip
def test_a_placement_other_than_the_profiles_is_refused_naming_both(clouds, kind, given, says):

    refused(shim_client(kind, clouds, True, **given), kind, says)


def test_with_options_to_another_region_is_refused_too(clouds):
    shim = shim_client("bedrock", clouds, True, aws_region="us-east-1")
    refused(shim.with_options(aws_region="eu-west-1"), "bedrock", "region 'eu-west-1'")


def refused(client: Any, kind: str, says: str) -> None:
    """The pool's refusal, as the shim raises every pool error before output: the SDK's connection error
    whose cause says why."""
    import anthropic
    import openai

    with pytest.raises((openai if kind == "azure" else anthropic).APIConnectionError) as caught:
        ask(client, kind, False, MODELS[kind])
    assert re.search(says, str(caught.value.__cause__)), caught.value.__cause__


def test_a_pool_that_allows_overrides_sends_to_the_clients_placement(fake, tmp_path):
    with clouds_pool(fake.url, tmp_path, only=("bedrock",), allow_overrides=True, **TEST_SETTINGS) as pool:
        shim = shim_client("bedrock", pool, True, aws_region="eu-west-1")
        assert ask(shim, "bedrock", False, MODELS["bedrock"])
        assert fake.stats()["signatures"][-1] | {"date": 0, "signature": 0} == {
            "date": 0, "signature": 0, "verified": True, "region": "eu-west-1"}  # fmt: skip


@pytest.mark.parametrize(
    "kind, given",
    [("bedrock", {"aws_access_key": "AKID", "aws_secret_key": "s3cret"}), ("bedrock", {"aws_profile": "prod"}),
     ("vertex", {"credentials": object()}), ("vertex", {"access_token": "ya29.token"}),
     ("azure", {"azure_ad_token_provider": lambda: "token", "api_version": AZURE_VERSION}),
     ("azure", {"api_key": "azure-key", "api_version": AZURE_VERSION}),
     ("bedrock", {"base_url": "https://vpce.example"})],
)  # fmt: skip
def test_a_cloud_classs_own_credentials_are_refused_the_workers_sign(clouds, kind, given):
    with pytest.raises(ValueError, match=f"workers sign .* with the {kind} profile's credentials: drop "):
        shim_client(kind, clouds, True, **given)


_SCRIPT = textwrap.dedent(
    """
    import sys
    import anthropic
    from anthropic.lib.bedrock import AnthropicBedrock

    assert anthropic.AnthropicBedrock is AnthropicBedrock
    client = anthropic.AnthropicBedrock(aws_region="us-east-1")
    with client.messages.stream(model=sys.argv[1], max_tokens=16,
                                messages=[{"role": "user", "content": "run"}]) as events:
        events.get_final_message()
    print(type(client).__module__, "botocore" in sys.modules)
    """
)


def test_isopool_run_takes_a_script_using_anthropic_bedrock(clouds, tmp_path):
    script = tmp_path / "bedrock_script.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    isopool = os.path.join(os.path.dirname(sys.executable), "isopool")
    out = subprocess.run([isopool, "run", "--pool", clouds.url, str(script), MODELS["bedrock"]], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["broker.shim", "False"]
