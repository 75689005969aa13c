"""Claude in Microsoft Foundry (issue 20, the newer clients): a profile of kind `foundry` runs on the
SDK's own AsyncAnthropicFoundry in the workers, and `broker.shim.anthropic.AnthropicFoundry` (sync and
async, streamed or not) answers as the SDK's own class does against the same fake, its key held by the
workers only; a resource other than its profile's is refused, as a region is; and through the gateway, the
SDK's own class reaches the profile with the gateway's profile header."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest

from broker import Pool
from broker.http.gateway import PROFILE_HEADER
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
        with Pool(profiles={"foundry": profile}, http="127.0.0.1:0", **TEST_SETTINGS) as pool:
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


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_the_sdks_own_foundry_class_pointed_at_the_gateway_reaches_the_foundry_profile(foundry, fake, stream):
    """Foundry has no cloud form of its own: its requests are Anthropic's `/v1/messages`, and the gateway takes
    them to the profile its header names. The workers send them to Foundry with their key (the README said
    this worked, untested)."""
    own = anthropic.AnthropicFoundry(base_url=foundry.http_url, api_key="caller-token", max_retries=0,
                                     default_headers={PROFILE_HEADER: "foundry"})  # fmt: skip
    direct = anthropic.AnthropicFoundry(base_url=fake.url + "/anthropic", api_key=KEY, max_retries=0)

    def at_foundry() -> int:  # a worker streams even a plain call (`foundry.messages.stream`)
        return sum(n for route, n in fake.stats()["served"].items() if route.startswith("foundry.messages"))

    before = at_foundry()
    assert ask(own, "foundry", stream, MODEL) == ask(direct, "foundry", stream, MODEL)
    assert at_foundry() == before + 2  # the gateway's call went to Foundry too
