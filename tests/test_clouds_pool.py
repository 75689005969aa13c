"""Cloud profiles in a real pool (issue 20, step 4): SDK calls on bedrock, vertex and azure profiles run
in workers on the SDKs' own cloud clients, with credentials only the workers hold (AWS keys that the
fake verifies SigV4 signatures with, a service account that google-auth exchanges at the fake's
/token, an Azure key or a managed-identity token), and get the same answers as the SDKs' own clients;
and the fault table holds on each: stalls before output retried invisibly, after output typed errors."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import pytest

from broker import BadRequest, ProviderConnectionError, StreamIncomplete, StreamStalled
from broker.client.client import CallLimits
from broker.errors import WorkerConfigError
from broker.protocol import HttpCall

from .cloudkit import MODELS, ask, cloud_client, clouds_pool, needs_clouds
from .conftest import TEST_SETTINGS, fault, worker_pids

pytestmark = [needs_clouds, pytest.mark.xdist_group(__name__)]  # its module-scoped pool on one worker

KINDS = ["bedrock", "vertex", "azure"]
METHOD = {"bedrock": "messages.create", "vertex": "messages.create", "azure": "chat.completions.create"}
POOL_MODELS = {**MODELS, "azure": "gpt-4o"}  # mapped by the profile to its deployment, "gpt-fake"


@pytest.fixture(scope="module")
def clouds(fake, tmp_path_factory):
    with clouds_pool(fake.url, tmp_path_factory.mktemp("gcp"), http="127.0.0.1:0", **TEST_SETTINGS) as pool:
        yield pool


@pytest.fixture(scope="module")
def cloud_pool(clouds):
    with clouds.client() as client:
        yield client


def _args(kind: str, prompt: str, **extra) -> dict:
    messages = [{"role": "user", "content": prompt}]
    if kind == "azure":
        return {"model": POOL_MODELS[kind], "messages": messages, **extra}
    return {"model": POOL_MODELS[kind], "max_tokens": 32, "messages": messages, **extra}


def _text(kind: str, events: list) -> str:
    if kind == "azure":
        return "".join((e.get("choices") or [{}])[0].get("delta", {}).get("content") or "" for e in events)
    return "".join(e["delta"].get("text", "") for e in events if e.get("type") == "content_block_delta")


def _answer(kind: str, body: dict) -> str:
    return body["choices"][0]["message"]["content"] if kind == "azure" else body["content"][0]["text"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_cloud_kind_answers_as_the_sdks_own_client_does(cloud_pool, fake, tmp_path, kind):
    prompt = f"pool {kind}"
    plain = cloud_pool.request(kind, METHOD[kind], **_args(kind, prompt))
    streamed = [e.json() for e in cloud_pool.submit(kind, METHOD[kind], stream=True, **_args(kind, prompt))]
    with cloud_client(kind, fake.url, tmp_path, sync=True) as sdk:  # the oracle: the SDK's own cloud client
        own = ask(sdk, kind, False, MODELS[kind], [{"role": "user", "content": prompt}])
    assert _answer(kind, plain.json()) == _text(kind, streamed) == own
    if kind == "bedrock":  # the worker signed with the AWS key in its environment; the fake verified it
        assert fake.stats()["signatures"][-1]["verified"]


def test_azure_with_entra_id_takes_a_managed_identity_token_in_the_worker(cloud_pool, fake):
    before = fake.stats()["served"].get("token.entra", 0)
    body = cloud_pool.request("azure-entra", METHOD["azure"], **_args("azure", "pool entra")).json()
    assert _answer("azure", body) and fake.stats()["served"]["token.entra"] == before + 1


@pytest.mark.parametrize(
    "profile, says",
    [("bedrock-no-profile", "The config profile \\(no-such-profile\\) could not be found"),
     ("vertex-no-file", "/nonexistent/service-account.json")],
)  # fmt: skip
def test_a_worker_that_cannot_sign_is_a_config_error_naming_the_cause(cloud_pool, profile, says):
    kind = profile.partition("-")[0]
    with pytest.raises(WorkerConfigError, match=says):
        cloud_pool.request(profile, METHOD[kind], **_args(kind, "no credentials"))


def test_the_zygote_preloads_each_cloud_kinds_libraries():
    """What a fresh worker's first cloud request would import (~0.1-0.15 s a kind, at every respawn)."""
    code = ("import sys; from worker.main import preload; preload(('bedrock', 'vertex', 'azure'))\n"
            "from anthropic.lib.bedrock._stream_decoder import get_response_stream_shape as shape\n"
            "wanted = ['boto3', 'botocore.eventstream', 'google.auth.transport.requests', 'azure.identity.aio']\n"
            "print([m for m in wanted if m not in sys.modules], shape.cache_info().currsize)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["[]", "1"], done.stderr


# The raw-HTTP relay: requests in the cloud's own form, authorized per attempt in the worker ---------


def _http(kind: str, prompt: str, stream: bool, headers: tuple = ()) -> HttpCall:
    """What the caller's SDK would send (its own path and body rules, no credentials), relative to the
    profile's base URL; Azure's without an api-version, which the worker adds from the profile."""
    messages = [{"role": "user", "content": prompt}]
    if kind == "azure":
        path, args = "/deployments/gpt-fake/chat/completions", {"model": MODELS[kind], "messages": messages}
        args |= {"stream": True} if stream else {}
    else:
        from anthropic._models import FinalRequestOptions

        args = {"model": MODELS[kind], "max_tokens": 32, "messages": messages, "stream": stream}
        with cloud_client(kind, "http://unused", Path(tempfile.mkdtemp()), sync=True) as sdk:
            options = sdk._prepare_options(FinalRequestOptions.construct(method="post", url="/v1/messages",
                                                                         json_data=args))  # fmt: skip
        path, args = options.url, options.json_data
    return HttpCall("POST", path, [("content-type", "application/json"), *headers], json.dumps(args).encode())


@pytest.mark.parametrize("kind", KINDS)
def test_a_relayed_request_in_the_clouds_own_form_is_authorized_by_the_worker(cloud_pool, fake, kind):
    plain = cloud_pool.submit_http(kind, _http(kind, f"relay {kind}", stream=False)).result()
    streamed = [e.json() for e in cloud_pool.submit_http(kind, _http(kind, f"relay {kind}", stream=True))]
    with cloud_client(kind, fake.url, Path(tempfile.mkdtemp()), sync=True) as sdk:
        own = ask(sdk, kind, False, MODELS[kind], [{"role": "user", "content": f"relay {kind}"}])
    assert _answer(kind, plain.json()) == _text(kind, streamed) == own  # a plain call was streamed and assembled
    if kind == "bedrock":
        assert fake.stats()["signatures"][-1]["verified"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_first_party_request_to_a_cloud_profile_is_put_in_the_clouds_form_in_the_worker(cloud_pool, kind):
    """`/v1/messages` by the SDK's own rules (model and stream to the path on Bedrock, anthropic_version),
    `/chat/completions` to the model's deployment: the same answers as the same SDK call."""
    args = _args(kind, f"first party {kind}")
    path = "/chat/completions" if kind == "azure" else "/v1/messages"
    headers = [("content-type", "application/json")]
    calls = [HttpCall("POST", path, headers, json.dumps({**args, "stream": s}).encode()) for s in (False, True)]
    plain = cloud_pool.submit_http(kind, calls[0]).result()
    streamed = [e.json() for e in cloud_pool.submit_http(kind, calls[1])]
    same = cloud_pool.request(kind, METHOD[kind], **args)
    assert _answer(kind, plain.json()) == _text(kind, streamed) == _answer(kind, same.json())


@pytest.mark.parametrize("kind", KINDS)
def test_the_gateways_first_party_routes_reach_a_cloud_profile_named_by_header(clouds, cloud_pool, kind):
    """A first-party SDK pointed at the gateway, `x-isopool-profile` naming the cloud profile."""
    import anthropic
    import openai

    route = {"default_headers": {"x-isopool-profile": kind}, "api_key": "unused", "max_retries": 0}
    args = _args(kind, f"gateway {kind}")
    same = _answer(kind, cloud_pool.request(kind, METHOD[kind], **args).json())
    if kind == "azure":
        sdk = openai.OpenAI(base_url=clouds.http_url + "/v1", **route)
        plain = sdk.chat.completions.create(**args).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(**args, stream=True)
                           if c.choices)  # fmt: skip
    else:
        sdk = anthropic.Anthropic(base_url=clouds.http_url, **route)
        plain = sdk.messages.create(**args).content[0].text
        with sdk.messages.stream(**args) as events:
            streamed = events.get_final_message().content[0].text
    assert plain == streamed == same


def test_a_vertex_request_is_placed_in_its_profiles_project_and_region(cloud_pool, fake):
    """A stand-in (the shim's `isopool`) takes the profile's; another project or region is refused."""
    call = _http("vertex", "placed", False)
    placed = call.path.replace("/projects/proj-test/locations/us-east5/", "/projects/isopool/locations/isopool/")
    before = fake.stats()["served"].get("vertex.at:proj-test/us-east5", 0)
    stand_in = cloud_pool.submit_http("vertex", msgspec.structs.replace(call, path=placed)).result()
    assert stand_in.body == cloud_pool.submit_http("vertex", call).result().body
    served = fake.stats()["served"]
    assert served["vertex.at:proj-test/us-east5"] == before + 2 and "vertex.at:isopool/isopool" not in served
    for elsewhere in ("/projects/other-proj/locations/us-east5/", "/projects/proj-test/locations/europe-west1/"):
        moved = msgspec.structs.replace(call, path=call.path.replace("/projects/proj-test/locations/us-east5/",
                                                                     elsewhere))  # fmt: skip
        with pytest.raises(BadRequest, match="but this profile sends to '(proj-test|us-east5)'"):
            cloud_pool.submit_http("vertex", moved).result()


@pytest.mark.parametrize("kind", ["bedrock", "vertex"])
def test_a_relayed_request_retried_after_a_kill_is_authorized_afresh(cloud_pool, fake, kind):
    """SigV4 dates have one-second resolution: the first attempt stalls 1.2 s before its kill."""
    before = fake.stats()
    stall = (("x-isopool-fault", "stall-first:interval=0.1"),)
    call = cloud_pool.submit_http(
        kind, _http(kind, f"resign {kind}", False, stall), CallLimits(first_event_timeout=1.2)
    )
    assert call.result().status == 200 and call.served.attempts == 2
    after = fake.stats()
    if kind == "bedrock":
        first, second = after["signatures"][len(before["signatures"]) :]
        assert first["verified"] and second["verified"]
        assert first["date"] != second["date"] and first["signature"] != second["signature"]
    else:  # the retry ran in a fresh worker, which fetched its own token
        assert after["served"]["token.goog"] == before["served"].get("token.goog", 0) + 1


def test_a_callers_own_aws_signature_is_dropped_and_the_worker_signs(cloud_pool, fake):
    forged = (("authorization", "AWS4-HMAC-SHA256 Credential=AKIDCALLER/20250101/us-east-1/bedrock/aws4_request, "
               "SignedHeaders=host, Signature=" + "0" * 64), ("x-amz-date", "20250101T000000Z"))  # fmt: skip
    assert cloud_pool.submit_http("bedrock", _http("bedrock", "forged", False, forged)).result().status == 200
    assert fake.stats()["signatures"][-1]["verified"]


# The fault table on each kind ------------------------------------------------------------------


def _pair(client, kind: str, prompt: str, spec: str, **limits):
    faulted = client.request(kind, METHOD[kind], **limits, **_args(kind, prompt), **fault(spec))
    return faulted, client.request(kind, METHOD[kind], **_args(kind, prompt))


def _kills(client, reason: str) -> int:
    return client.stats()["kills"].get(reason, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_f1_no_first_event_is_killed_and_retried(cloud_pool, kind):
    before = _kills(cloud_pool, "first_event_timeout")
    # 1 s, not 0.5: the retry runs in a fresh worker, whose first request also resolves its credentials
    faulted, clean = _pair(cloud_pool, kind, f"f1 {kind}", "stall-first:interval=0.1", first_event_timeout=1.0)
    assert faulted.body == clean.body and _kills(cloud_pool, "first_event_timeout") == before + 1


STALLS = ["stall-ping:after=5,interval=0.1", "stall-comment:after=5,interval=0.1", "silent:after=5"]


@pytest.mark.parametrize("spec", STALLS, ids=["F2-ping", "F3-comment", "F4-silent"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_stall_before_output_is_retried_invisibly(cloud_pool, kind, spec):
    before = _kills(cloud_pool, "stale_timeout")
    faulted, clean = _pair(cloud_pool, kind, f"unseen {kind} {spec}", spec, stale_timeout=0.4)
    assert faulted.body == clean.body and _kills(cloud_pool, "stale_timeout") == before + 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_stall_after_output_is_a_typed_error(cloud_pool, kind):
    call = cloud_pool.submit(kind, METHOD[kind], stale_timeout=0.4, stream=True,
                             **_args(kind, f"seen {kind}"), **fault("stall-ping:after=5,interval=0.1"))  # fmt: skip
    events, start = [], time.monotonic()
    with pytest.raises(StreamStalled, match="stale_timeout") as caught:
        events.extend(call)
    assert time.monotonic() - start >= 0.4
    # Anthropic's `ping` (a chunk on Bedrock) and Azure's prompt-filter chunk: only real events count
    assert len(events) == caught.value.delivered == (5 if kind == "azure" else 4)


@pytest.mark.parametrize("kind", KINDS)
def test_f5_a_drip_faster_than_stale_timeout_is_not_killed_and_a_slower_one_is(cloud_pool, kind):
    before = _kills(cloud_pool, "stale_timeout")
    faulted, clean = _pair(cloud_pool, kind, f"f5 {kind}", "drip:gap=0.05", stale_timeout=1.0)
    assert faulted.body == clean.body and _kills(cloud_pool, "stale_timeout") == before
    faulted, clean = _pair(cloud_pool, kind, f"f5 slow {kind}", "drip:gap=0.8", stale_timeout=0.3)
    assert faulted.body == clean.body and _kills(cloud_pool, "stale_timeout") == before + 1


@pytest.mark.parametrize("kind", KINDS)
def test_f6_a_connection_lost_is_retried_unseen_and_an_error_seen(cloud_pool, kind):
    faulted, clean = _pair(cloud_pool, kind, f"f6 {kind}", "reset:after=5")
    assert faulted.body == clean.body
    with pytest.raises(ProviderConnectionError):
        list(
            cloud_pool.submit(
                kind, METHOD[kind], stream=True, **_args(kind, f"f6 seen {kind}"), **fault("reset:after=5")
            )
        )


@pytest.mark.parametrize("kind", KINDS)
def test_f7_provider_errors_and_error_events_are_retried_before_output(cloud_pool, kind):
    pids = worker_pids(cloud_pool)
    faulted, clean = _pair(cloud_pool, kind, f"f7 {kind}", "http-500")
    assert faulted.body == clean.body and worker_pids(cloud_pool) == pids  # a provider error is not a stall
    call = cloud_pool.submit(kind, METHOD[kind], **_args(kind, f"f7 event {kind}"), **fault("error-event:after=4"))
    assert call.result().status == 200 and call.served.attempts == 2


@pytest.mark.parametrize("kind", KINDS)
def test_f15_f16_a_cut_stream_is_never_a_success_and_a_malformed_event_is_dropped(cloud_pool, kind):
    with pytest.raises(StreamIncomplete, match="without"):
        list(cloud_pool.submit(kind, METHOD[kind], stream=True, **_args(kind, f"cut {kind}"), **fault("cut")))
    rescued, clean = _pair(cloud_pool, kind, f"cut plain {kind}", "cut")
    assert rescued.body == clean.body
    bad, clean = _pair(cloud_pool, kind, f"bad {kind}", "malformed")
    assert bad.malformed_events == 1 and bad.body == clean.body


@pytest.mark.parametrize("kind", KINDS)
def test_each_cloud_kind_is_billed_what_the_provider_reported(cloud_pool, fake, kind):
    """Bedrock's event-stream frames, Vertex's and Azure's streams: read like a first-party stream."""
    fields = ("input", "output", "cache_read", "cache_write")
    before = fake.stats()["usage"]
    was = cloud_pool.snapshot().tokens
    cloud_pool.request(kind, METHOD[kind], **_args(kind, f"billed {kind}"))
    list(cloud_pool.submit(kind, METHOD[kind], stream=True, **_args(kind, f"billed {kind}, streamed")))
    after, now = fake.stats()["usage"], cloud_pool.snapshot().tokens
    grew = {f: sum(getattr(t, f) for t in now.values()) - sum(getattr(t, f) for t in was.values()) for f in fields}
    assert grew == {f: after[f] - before[f] for f in fields} and grew["output"] > 0
    assert {key.partition("/")[0] for key in now} >= {kind}
