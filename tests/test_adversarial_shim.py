"""Credentials and headers on the shim's path (and the gateway's, which is the same worker path):
a caller's own key, token, organization and project reach the provider as its SDK sent them,
the pool's own key goes only to the pool's provider, the profile's default headers go on every
path, and headers that frame the HTTP request itself are never forwarded.

The pools here hold keys that differ from the callers' (conftest's), and the fake provider
tells which headers each request came with, so each test sees whose credentials were used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request

import anthropic
import msgspec
import pytest

from broker import BadRequest, Pool
from broker.protocol import HttpCall
from broker.shim import anthropic as shim_anthropic
from broker.shim import openai as shim_openai

from .conftest import TEST_SETTINGS, anthropic_args, profiles

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker

POOL_ENV = {
    "ANTHROPIC_API_KEY": "sk-ant-pool-secret",
    "OPENAI_API_KEY": "sk-pool-secret",
    "OPENAI_ORG_ID": "org-pool",
    "OPENAI_PROJECT_ID": "proj-pool",
}
PROFILE_HEADERS = {"X-Profile-Tag": "from-profile"}
CREDENTIALS = ("authorization", "x-api-key")
MSG = anthropic_args("whose key?", max_tokens=8)
CHAT = dict(model="gpt-fake", messages=[{"role": "user", "content": "whose key?"}])
FRAMING = ("Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "TE", "Keep-Alive",
           "Proxy-Connection")  # fmt: skip


@pytest.fixture(scope="module")
def own(fake):
    """A pool that lets callers bring their own key and base_url, as an embedded one does, with
    keys, organization and project of its own in its environment, default headers in its
    profiles, and the HTTP gateway."""
    settings = dict(TEST_SETTINGS, allow_overrides=True, http="127.0.0.1:0")
    with pytest.MonkeyPatch.context() as env:  # the broker, and so its workers, inherit this environment
        for name, value in POOL_ENV.items():
            env.setenv(name, value)
        pool = Pool(profiles=profiles(fake.url, min_workers=1, default_headers=PROFILE_HEADERS), **settings)
        pool.start()
    with pool:
        yield pool


def received(fake, request_id: str) -> dict[str, str]:
    """The headers (lower-case names) the fake provider received with the request it answered as `request_id`."""
    with urllib.request.urlopen(f"{fake.url}/_isopool/requests/{request_id}", timeout=10) as resp:
        return json.load(resp)


def chat_request_id(client) -> str:
    """The request id of a chat completion (its header: openai < 1.46 has no `_request_id` on a result)."""
    return client.chat.completions.with_raw_response.create(**CHAT).headers["x-request-id"]


def served(fake) -> int:
    return sum(fake.stats()["served"].values())


def pick(headers: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {name: headers[name] for name in names if name in headers}


_EMBEDDED = textwrap.dedent(
    """
    import asyncio, sys
    import openai as sdk
    from broker.shim import openai

    async def main():
        client = openai.AsyncOpenAI(base_url=sys.argv[1], api_key="sk-caller-own", organization="org-caller",
                                    project="proj-caller", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(model="gpt-fake",
                                                                     messages=[{"role": "user", "content": "x"}])
        print(raw.headers["x-request-id"])  # a result's `_request_id` from openai 1.46 on
        keyless = openai.AsyncOpenAI(max_retries=0)  # the pool's key: there is none
        try:
            await keyless.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "x"}])
        except openai.APIConnectionError as exc:
            print(exc.__cause__)
        try:
            sdk.OpenAI()  # the SDK's own reason, in the words of its release
        except sdk.OpenAIError as exc:
            print(exc)

    asyncio.run(main())
    """
)


def test_an_embedded_pool_sends_an_explicit_key_organization_and_project_with_no_key_in_the_environment(
    fake, own_processes
):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ISOPOOL_URL")}
    env["OPENAI_BASE_URL"] = fake.url + "/v1"  # the embedded pool's own upstream, too
    before = served(fake)
    out = subprocess.run([sys.executable, "-c", _EMBEDDED, fake.url + "/v1"], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    request_id, keyless, reason = out.stdout.strip().split("\n")
    assert "OPENAI_API_KEY" in reason and reason in keyless  # a call needing the pool's key: the SDK's own reason
    assert served(fake) == before + 1  # and is never sent
    seen = received(fake, request_id)
    want = {"authorization": "Bearer sk-caller-own", "openai-organization": "org-caller",
            "openai-project": "proj-caller"}  # fmt: skip
    assert pick(seen, tuple(want)) == want


@pytest.mark.parametrize("credential", [{"api_key": "sk-ant-caller-own"}, {"auth_token": "tok-caller-own"}])
def test_an_anthropic_key_or_token_reaches_the_provider_as_the_sdk_sends_it(fake, own, credential):
    with anthropic.Anthropic(base_url=fake.url, **credential) as direct:
        expected = pick(received(fake, direct.messages.create(**MSG)._request_id), CREDENTIALS)
    with shim_anthropic.Anthropic(pool=own, **credential) as client:
        seen = received(fake, client.messages.create(**MSG)._request_id)
    assert pick(seen, CREDENTIALS) == expected
    assert POOL_ENV["ANTHROPIC_API_KEY"] not in str(seen)


def test_the_pools_key_carries_the_pools_organization_and_project_unless_the_caller_names_its_own(fake, own):
    with shim_openai.OpenAI(pool=own) as client:
        seen = received(fake, chat_request_id(client))
    want = {"authorization": "Bearer sk-pool-secret", "openai-organization": "org-pool", "openai-project": "proj-pool"}
    assert pick(seen, tuple(want)) == want
    with shim_openai.OpenAI(pool=own, organization="org-caller") as client:
        seen = received(fake, chat_request_id(client))
    assert (seen["openai-organization"], seen["openai-project"]) == ("org-caller", "proj-pool")
    with shim_openai.OpenAI(pool=own, api_key="sk-caller-own") as client:  # they go with the pool's key only
        seen = received(fake, chat_request_id(client))
    assert seen["authorization"] == "Bearer sk-caller-own"
    assert "openai-organization" not in seen and "openai-project" not in seen


def test_profile_default_headers_reach_the_provider_on_every_path(fake, own):
    with own.client() as client:  # the SDK call path: the worker's own SDK client
        sdk_path = client.request("anthropic", "messages.create", **MSG)
    ids = [dict(sdk_path.headers)["request-id"]]
    with shim_anthropic.Anthropic(pool=own) as claude, shim_openai.OpenAI(pool=own, api_key="sk-caller-own") as gpt:
        ids += [claude.messages.create(**MSG)._request_id, chat_request_id(gpt)]
    with anthropic.Anthropic(base_url=own.http_url) as through_gateway:
        ids.append(through_gateway.messages.create(**MSG)._request_id)
    assert [received(fake, rid).get("x-profile-tag") for rid in ids] == ["from-profile"] * 4


def test_a_base_url_override_without_its_own_key_is_refused_and_never_gets_the_pools(fake, own):
    before = served(fake)
    body = msgspec.json.encode(MSG)
    call = HttpCall("POST", "/v1/messages", [("content-type", "application/json")], body, base_url=fake.url)
    with own.client() as client, pytest.raises(BadRequest, match="api_key"):
        client.submit_http("anthropic", call).result()
    assert served(fake) == before
    # The shim's client without a key of its own sends the one its SDK finds, as the SDK would: the caller's.
    with anthropic.Anthropic(base_url=fake.url) as direct:
        expected = pick(received(fake, direct.messages.create(**MSG)._request_id), CREDENTIALS)
    with shim_anthropic.Anthropic(pool=own, base_url=fake.url) as client:
        seen = received(fake, client.messages.create(**MSG)._request_id)
    assert pick(seen, CREDENTIALS) == expected
    assert POOL_ENV["ANTHROPIC_API_KEY"] not in str(seen)


@pytest.mark.parametrize("name", FRAMING)
def test_framing_headers_are_refused_on_the_sdk_and_http_paths(fake, own, name):
    before = served(fake)
    with own.client() as client:
        with pytest.raises(BadRequest, match=name):
            client.request("anthropic", "messages.create", **MSG, extra_headers={name: "evil.example"})
        call = HttpCall("POST", "/v1/messages", [(name, "evil.example")], msgspec.json.encode(MSG))
        with pytest.raises(BadRequest, match=name):
            client.submit_http("anthropic", call).result()
    assert served(fake) == before


def test_the_shim_never_forwards_framing_headers_a_caller_adds(fake, own):
    added = {"Host": "evil.example", "Upgrade": "h2c", "Keep-Alive": "timeout=600", "TE": "trailers",
             "Proxy-Connection": "keep-alive"}  # fmt: skip
    with shim_anthropic.Anthropic(pool=own) as client:
        seen = received(fake, client.messages.create(**MSG, extra_headers=added)._request_id)
    assert seen["host"] == fake.url.removeprefix("http://")
    assert not {name.lower() for name in added if name != "Host"} & seen.keys()


@pytest.mark.parametrize("path", ["/v1/%2e%2e/admin", "/v1/..%2fadmin", "/v1/%252e%252e/admin", "/v1/a\\..\\admin"])
def test_encoded_dot_segments_never_leave_the_base_url(client, fake, path):
    """The workers confined paths by their raw text: `%2e%2e` and `..%2f` went upstream unchanged,
    for a server (or a proxy before it) that decodes them to climb above the API's root."""
    served = fake.stats()["completed"]
    with pytest.raises(BadRequest, match="dot segments"):
        client.submit_http("anthropic", HttpCall("GET", path)).result()
    assert fake.stats()["completed"] == served
