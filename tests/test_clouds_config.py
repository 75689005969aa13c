"""Cloud profile kinds (issue 20, step 1): their settings are checked per kind, each kind belongs to
the family of the SDK it runs on, and a kind whose extra is missing says which extra to install."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from broker import extras
from broker.config import ConfigError, load_settings

from .cloudkit import needs_clouds


@needs_clouds
def test_cloud_profiles_load_with_their_settings():
    profiles = {
        "bedrock": {"kind": "bedrock", "region": "us-east-1", "aws_profile": "prod"},
        "vertex": {"kind": "vertex", "region": "us-east5", "project": "proj", "credentials_file": "/sa.json"},
        "azure": {
            "kind": "azure",
            "endpoint": "https://res.openai.azure.com",
            "api_version": "2024-10-21",
            "azure_deployments": {"gpt-4o": "prod-gpt4o"},
            "auth": "key",
        },  # fmt: skip
    }
    s = load_settings(env={}, profiles=profiles)
    assert {n: p.family for n, p in s.profiles.items()} == {"bedrock": "anthropic", "vertex": "anthropic",
                                                            "azure": "openai"}  # fmt: skip
    assert s.profiles["azure"].azure_deployments == {"gpt-4o": "prod-gpt4o"}
    assert load_settings(env={}).profiles["openai"].family == "openai"


@pytest.mark.parametrize(
    "profile, named",
    [
        ({"kind": "anthropic", "region": "us-east-1"}, "region is a setting of bedrock and vertex profiles"),
        ({"kind": "bedrock", "project": "p"}, "project is a setting of vertex profiles"),
        ({"kind": "vertex", "endpoint": "https://x"}, "endpoint is a setting of azure profiles"),
        ({"kind": "openai", "azure_deployments": {"a": "b"}}, "azure_deployments is a setting of azure profiles"),
        ({"kind": "azure", "aws_profile": "prod"}, "aws_profile is a setting of bedrock profiles"),
        ({"kind": "azure", "auth": "password"}, "auth"),
        ({"kind": "gemini"}, "kind"),
    ],
)
def test_a_cloud_setting_on_another_kind_names_itself(profile, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(env={}, profiles={"p": profile})


@pytest.mark.parametrize(
    "kind, auth, hidden, extra",
    [
        ("bedrock", "", "boto3", "isopool[bedrock]"),
        ("vertex", "", "google.auth", "isopool[vertex]"),
        ("azure", "entra", "azure.identity", "isopool[azure]"),
    ],
)
def test_a_missing_extra_names_itself(monkeypatch, kind, auth, hidden, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hidden else real(name, *a))
    with pytest.raises(ConfigError, match=rf"profile p: kind \"{kind}\" needs .*pip install '{re.escape(extra)}'"):
        load_settings(env={}, profiles={"p": {"kind": kind, "auth": auth or None}})


def test_azure_with_a_key_needs_no_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # nothing importable at all
    extras.require("azure", "key")  # openai alone sends an api-key


@needs_clouds  # the process hides boto3 only: with botocore missing as well, the message would name it first
def test_a_missing_extra_names_itself_in_a_process_without_the_library():
    """No monkeypatching: a process in which `boto3` cannot be imported at all."""
    code = ("import sys; sys.modules['boto3'] = None\n"
            "from broker.config import load_settings\n"
            "load_settings(env={}, profiles={'b': {'kind': 'bedrock', 'region': 'us-east-1'}})\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert 'profile b: kind "bedrock" needs the AWS libraries' in done.stderr
    assert "pip install 'isopool[bedrock]'" in done.stderr
