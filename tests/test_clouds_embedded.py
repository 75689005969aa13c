"""`isopool run script.py` with no pool configured (issue 20): the embedded pool carries a dormant
profile of each cloud kind whose libraries are installed, so a script that builds the SDK's own
`AnthropicBedrock`, `AnthropicVertex` or `AzureOpenAI` runs through the pool unchanged. Each client's
region, project, endpoint and api-version come from where its SDK reads them (its constructor, else the
environment), its credentials from the cloud's usual chain in the workers, never in the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from broker.config import load_settings
from broker.shim.clouds import embedded_settings

from .cloudkit import AZURE_VERSION, MODELS, TEST_AWS_KEY, needs_clouds, service_account
from .conftest import assert_dead

ISOPOOL = os.path.join(os.path.dirname(sys.executable), "isopool")

# The same script, as a team has it: the SDKs' own classes, placed and pointed where the SDK reads it.
_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import anthropic
    import openai
    import psutil

    fake, models = sys.argv[1], json.loads(sys.argv[2])
    prompt = [{"role": "user", "content": "one import"}]
    clients = {
        "bedrock": anthropic.AnthropicBedrock(aws_region="us-east-1", base_url=fake),  # keys: AWS_* env
        "vertex": anthropic.AnthropicVertex(project_id="proj-test"),  # region, base URL, ADC: the environment
        "azure": openai.AzureOpenAI(azure_endpoint=fake),  # api-version and key: the environment
        "foundry": anthropic.AnthropicFoundry(base_url=fake + "/anthropic"),  # key: the environment
    }
    answers = {}
    for kind, client in clients.items():
        model = models[kind]
        if kind == "azure":
            answer = client.chat.completions.create(model=model, messages=prompt)
            answers[kind] = answer.choices[0].message.content
            chunks = client.chat.completions.create(model=model, messages=prompt, stream=True)
            answers[kind + " stream"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            continue
        answers[kind] = client.messages.create(model=model, max_tokens=32, messages=prompt).content[0].text
        with client.messages.stream(model=model, max_tokens=32, messages=prompt) as events:
            answers[kind + " stream"] = events.get_final_message().content[0].text
    print(json.dumps({
        "answers": answers,
        "classes": sorted({type(c).__module__ for c in clients.values()}),
        "loaded": [m for m in ("botocore", "boto3", "google.auth", "azure.identity") if m in sys.modules],
        "children": [p.pid for p in psutil.Process().children(recursive=True)],
    }))
    """
)


def _environment(fake_url: str, tmp_path) -> dict[str, str]:
    """What the SDKs read: AWS keys, Google ADC (a service-account file whose token endpoint is the fake's),
    Vertex's region and base URL, Azure's key and api-version; no isopool setting at all."""
    sdk_settings = ("ISOPOOL_", "AWS_", "GOOGLE_", "AZURE_", "CLOUD_ML_", "ANTHROPIC_", "OPENAI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(sdk_settings)}
    none = str(tmp_path / "none")
    return env | {
        "AWS_ACCESS_KEY_ID": TEST_AWS_KEY[0], "AWS_SECRET_ACCESS_KEY": TEST_AWS_KEY[1],
        "AWS_CONFIG_FILE": none, "AWS_SHARED_CREDENTIALS_FILE": none, "AWS_EC2_METADATA_DISABLED": "true",
        "GOOGLE_APPLICATION_CREDENTIALS": str(service_account(tmp_path, fake_url)),
        "CLOUD_ML_REGION": "us-east5", "ANTHROPIC_VERTEX_BASE_URL": fake_url + "/v1",
        "AZURE_OPENAI_API_KEY": "azure-test-key", "OPENAI_API_VERSION": AZURE_VERSION,
        "ANTHROPIC_FOUNDRY_API_KEY": "foundry-test-key",
    }  # fmt: skip


def _run(command: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@needs_clouds
def test_isopool_run_sends_a_scripts_own_cloud_clients_through_dormant_profiles(fake, tmp_path, own_processes):
    script = tmp_path / "clouds_script.py"
    script.write_text(_SCRIPT)
    env, args = _environment(fake.url, tmp_path), [fake.url, json.dumps({**MODELS, "foundry": "claude-fake"})]
    plain = _run([sys.executable, str(script), *args], env)
    pooled = _run([ISOPOOL, "run", str(script), *args], env)
    assert pooled["answers"] == plain["answers"] and all(plain["answers"].values()) and len(plain["answers"]) == 8
    assert pooled["classes"] == ["broker.shim"] and plain["classes"] != ["broker.shim"]
    assert pooled["loaded"] == [] and "botocore" in plain["loaded"]  # the workers signed, not the script
    assert pooled["children"]  # its embedded pool: gone with it
    assert_dead(set(pooled["children"]))


_HIDDEN = textwrap.dedent(
    """
    import sys
    sys.modules["botocore"] = None  # as if the AWS libraries were not installed

    from broker.shim import anthropic  # what `isopool run` installs as anthropic's

    anthropic.AnthropicBedrock(aws_region="us-east-1")
    """
)


def test_a_cloud_class_whose_libraries_are_missing_names_the_extra(tmp_path, own_processes):
    """Before any pool starts: the embedded pool could not have a profile of its kind."""
    script = tmp_path / "hidden.py"
    script.write_text(_HIDDEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOPOOL_")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    says = 'AnthropicBedrock: the pool\'s workers sign its requests, and kind "bedrock" needs the AWS libraries'
    assert f"{says} (botocore, boto3): pip install 'isopool[bedrock]'" in out.stderr


@needs_clouds
def test_the_embedded_pool_adds_a_dormant_profile_per_installed_cloud_kind_it_lacks():
    settings = embedded_settings(load_settings(env={}, allow_overrides=True))
    clouds = {name: p for name, p in settings.profiles.items() if name not in ("anthropic", "openai")}
    assert {name: p.kind for name, p in clouds.items()} == {k: k for k in ("bedrock", "vertex", "azure", "foundry")}
    assert all(p.min_workers == 0 and p.spare_workers == 0 and p.region is None for p in clouds.values())
    configured = load_settings(env={}, profiles={"eu": {"kind": "bedrock", "region": "eu-west-1"}})
    assert set(embedded_settings(configured).profiles) == {
        "eu",
        "vertex",
        "azure",
        "foundry",
    }  # its own bedrock profile stays


@pytest.mark.parametrize("kind", ["bedrock", "vertex"])
def test_only_the_cloud_kinds_whose_libraries_are_installed_get_a_profile(monkeypatch, kind):
    monkeypatch.setitem(sys.modules, "botocore" if kind == "bedrock" else "google.auth", None)
    assert kind not in embedded_settings(load_settings(env={})).profiles


@needs_clouds
def test_a_dormant_cloud_profiles_first_call_made_while_the_zygote_imports_gets_a_worker(fake, tmp_path):
    """The zygote imports the profiles' SDKs but not a dormant profile's cloud libraries (its worker imports
    its own). A spawn for it that came during the imports was held until the zygote's next pipe event: the
    call waited out startup_timeout (an `isopool run` of a Bedrock script hung on a loaded machine)."""
    import time

    from broker import Pool

    profiles = {
        "anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 1},
        "bedrock": {"kind": "bedrock", "region": "us-east-1", "base_url": fake.url, "min_workers": 0,
                    "spare_workers": 0},
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", TEST_AWS_KEY[0])
        env.setenv("AWS_SECRET_ACCESS_KEY", TEST_AWS_KEY[1])
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        pool = Pool(profiles=profiles, startup_timeout=300).start(wait=False)  # submitted while it imports
        try:
            with pool.client() as client:
                started = time.monotonic()
                answer = client.request("bedrock", "messages.create", model=MODELS["bedrock"], max_tokens=16,
                                        messages=[{"role": "user", "content": "early"}], deadline=60)  # fmt: skip
                assert answer.json()["content"], "no answer"
                assert time.monotonic() - started < 60
        finally:
            pool.stop()
