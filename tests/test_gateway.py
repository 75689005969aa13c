"""The HTTP gateway: the real SDK clients pointed at it with `base_url` behave as against the
provider, and the pool's faults are handled behind it."""

from __future__ import annotations

import anthropic
import openai
import psutil
import pytest

from broker import ConfigError, Pool

from .conftest import TEST_SETTINGS, fault, profiles
from .test_nonascii_headers import raw_request
from .test_shim import CHAT, MSG, anthropic_scenarios, openai_scenarios, plain

pytestmark = pytest.mark.xdist_group(__name__)  # its module-scoped fixtures started once, on one worker


@pytest.fixture(scope="module")
def gateway(fake):
    settings = dict(TEST_SETTINGS, first_event_timeout=1.0, stale_timeout=0.5, http="127.0.0.1:0")
    with Pool(profiles=profiles(fake.url, min_workers=1), **settings) as pool:
        yield pool


@pytest.mark.parametrize("scenarios", [anthropic_scenarios, openai_scenarios], ids=["anthropic", "openai"])
def test_sdk_through_the_gateway_matches_the_sdk_direct(fake, gateway, scenarios):
    if scenarios is anthropic_scenarios:
        direct, relayed = anthropic.Anthropic(base_url=fake.url), anthropic.Anthropic(base_url=gateway.http_url)
    else:
        direct = openai.OpenAI(base_url=fake.url + "/v1")
        relayed = openai.OpenAI(base_url=gateway.http_url + "/v1")
    with direct, relayed:
        expected, got = list(scenarios(direct)), list(scenarios(relayed))
    for (name, want), (_, have) in zip(expected, got, strict=True):
        assert plain(have) == plain(want), name


def test_unseen_stall_is_invisible_and_a_seen_one_is_an_error_event(fake, gateway):
    with anthropic.Anthropic(base_url=gateway.http_url) as client, anthropic.Anthropic(base_url=fake.url) as direct:
        args = dict(MSG, messages=[{"role": "user", "content": "gateway unseen"}])
        got = client.messages.create(**args, **fault("stall-ping:after=3,interval=0.05"))
        assert plain(got) == plain(direct.messages.create(**args))
        with pytest.raises(anthropic.APIStatusError, match="stale_timeout"):
            list(client.messages.create(stream=True, **MSG, **fault("stall-comment:after=3,interval=0.05")))
    with openai.OpenAI(base_url=gateway.http_url + "/v1") as client:
        with pytest.raises(openai.APIError, match="stale_timeout"):
            list(client.chat.completions.create(stream=True, **CHAT, **fault("silent:after=3")))


def test_models_endpoint_is_relayed(gateway):
    with openai.OpenAI(base_url=gateway.http_url + "/v1") as client:
        assert {m.id for m in client.models.list()} >= {"gpt-fake"}


def test_gateway_off_loopback_needs_its_own_token(fake):
    with pytest.raises(ConfigError, match="gateway_token"):
        Pool(profiles=profiles(fake.url), http="0.0.0.0:0")
    settings = dict(TEST_SETTINGS, http="0.0.0.0:0", gateway_token="gw-secret")
    with Pool(profiles=profiles(fake.url, min_workers=1), **settings) as pool:
        port = pool.http_url.rsplit(":", 1)[1]
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="sk-provider-key").messages.create(**MSG)
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="gw-secret")
        assert client.messages.create(**MSG).type == "message"
        assert raw_request(f"http://127.0.0.1:{port}", "x-api-key: gw-secrét".encode("latin-1"))[0] == 401


def _callers_ports(pool: Pool) -> set[int]:
    """The callers' ports of the gateway's open connections, seen from the gateway's process."""
    port = int(pool.http_url.rsplit(":", 1)[1])
    (gateway,) = [p for p in psutil.Process(pool.pid).children() if "broker.http.gateway" in " ".join(p.cmdline())]
    return {c.raddr.port for c in gateway.net_connections("tcp") if c.laddr.port == port and c.raddr}


def test_an_sdk_client_keeps_one_connection_to_the_gateway_across_calls(gateway):
    """The gateway answers keep-alive: a new TCP connection per call would cost the caller a handshake."""
    seen: set[int] = set()
    with anthropic.Anthropic(base_url=gateway.http_url) as client:
        for i in range(4):
            list(client.messages.create(stream=True, **dict(MSG, messages=[{"role": "user", "content": f"ka {i}"}])))
            client.messages.create(**MSG)
            seen |= _callers_ports(gateway)
    assert len(seen) == 1, f"the SDK's calls came on {len(seen)} connections"
