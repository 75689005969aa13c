"""Claude in Microsoft Foundry (issue 20, the newer clients): a profile of kind `foundry` runs on the
SDK's own AsyncAnthropicFoundry in the workers, and `broker.shim.anthropic.AnthropicFoundry` (sync and
async, streamed or not) answers as the SDK's own class does against the same fake, its key held by the
workers only; a resource other than its profile's is refused, as a region is."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest

from broker import Pool
from broker.shim import anthropic as shim_anthropic

from .cloudkit import ask, ask_async
from .conftest import TEST_SETTINGS

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped pool on one worker
MODEL, KEY = "claude-fake", "foundry-test-key"


@pytest.fixture(scope="module")
def foundry(fake):
    profile = {"kind": "foundry", "base_url": fake.url + "/anthropic", "api_key_env": "TEST_FOUNDRY_KEY",
               "min_workers": 1, "spare_workers": 0, "max_workers": 2}  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TEST_FOUNDRY_KEY", KEY)
        with Pool(profiles={"foundry": profile}, **TEST_SETTINGS) as pool:
            yield pool


def answer(client: Any, sync: bool, stream: bool) -> str:
    return ask(client, "foundry", stream, MODEL) if sync else asyncio.run(ask_async(client, "foundry", stream, MODEL))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_the_shims_foundry_class_answers_as_the_sdks_own(foundry, fake, sync, stream):
    prefix = "" if sync else "Async"
    shim = getattr(shim_anthropic, f"{prefix}AnthropicFoundry")(pool=foundry)
    own = getattr(anthropic, f"{prefix}AnthropicFoundry")(base_url=fake.url + "/anthropic", api_key=KEY, max_retries=0)
    assert isinstance(shim, type(own))
    assert answer(shim, sync, stream) == answer(own, sync, stream)


def test_a_foundry_resource_other_than_the_profiles_is_refused(foundry):
    shim = shim_anthropic.AnthropicFoundry(pool=foundry, resource="elsewhere")
    with pytest.raises(anthropic.APIConnectionError) as caught:
        ask(shim, "foundry", False, MODEL)
    assert "the client names foundry resource 'elsewhere', but this profile sends to None" in str(
        caught.value.__cause__
    )


def test_a_foundry_classs_own_key_is_refused_the_workers_hold_it(foundry):
    with pytest.raises(ValueError, match="with the foundry profile's credentials: drop api_key"):
        shim_anthropic.AnthropicFoundry(pool=foundry, api_key="own-key")
