"""The clouds' routes of the fake provider: Claude on Bedrock and on Vertex AI, GPT on Azure OpenAI.

Each route checks what the cloud checks (its path, its body's rules, its credentials), then answers
through FakeProvider.answer with the same replies and faults as the first-party routes, in the
cloud's wire format and error shapes. The credentials are checked with the real protocols, so the
SDKs' own credential code runs against the fake with no network:
- Bedrock: a SigV4 `Authorization` (well-formed, dated, for service `bedrock`, signing the host and
  date) or a bearer API key. A request signed with TEST_AWS_KEY is verified with botocore's signer
  over the method, path, headers and body that arrived; every signature is recorded (`signatures`
  in the stats), so that a test can tell a retry was signed afresh.
- Vertex: a bearer token; one of the form `goog-N` must be one `POST /token` issued. That endpoint is
  an OAuth JWT-bearer grant, as a service account's `token_uri` names it (real google-auth refreshes
  against it).
- Azure: `api-version` in the query (else 404), and `api-key` or a bearer token; one of the form
  `entra-N` must be one `GET /msi/token` issued: the App Service managed-identity endpoint that
  azure-identity's DefaultAzureCredential calls when IDENTITY_ENDPOINT and IDENTITY_HEADER name it.
- Foundry (Claude in Microsoft Foundry): Anthropic's API under `/anthropic`, with `x-api-key` or such
  an Entra ID token.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from aiohttp import web

from .errors import error_response
from .formats import AnthropicMessages, OpenAIChat, OpenAIResponses
from .framing import EventStream, Sse

TEST_AWS_KEY = ("AKIAISOPOOLFAKE00000", "isopool-fake-aws-secret-key")  # (access key id, secret): verified
_SIGV4 = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([A-Z0-9]+)/(\d{8})/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request, "
    r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})"
)
_AMZ_DATE = re.compile(r"\d{8}T\d{6}Z")
_REMEMBERED = 1000
_BEDROCK_MALFORMED = "Malformed input request: {}, please reformat your input and try again."
_AZURE_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
    "key for an active subscription and use a correct regional API endpoint for your resource."
)
_FILTERS = {name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")}


class AzureChat(OpenAIChat):
    """Azure's chat stream: OpenAI's, opened by a chunk of no choices that reports the prompt's filtering."""

    @classmethod
    def events(cls, reply: Any, body: dict[str, Any]) -> list[Any]:
        results = [{"prompt_index": 0, "content_filter_results": _FILTERS}]
        first = {"id": "", "object": "", "created": 0, "model": "", "choices": [], "prompt_filter_results": results}
        return [(None, first), *super().events(reply, body)]


class CloudRoutes:
    """The clouds' routes of one FakeProvider, the tokens they issued and the signatures they saw."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.issued: set[str] = set()
        self.signatures: list[dict[str, Any]] = []

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/model/{model}/{action:invoke|invoke-with-response-stream}", self.bedrock)
        app.router.add_post("/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{call}", self.vertex)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.azure)
        app.router.add_post("/openai/responses", self.azure)
        app.router.add_post("/anthropic/v1/messages", self.foundry)
        app.router.add_post("/token", self.google_token)
        app.router.add_get("/msi/token", self.azure_token)

    def reset(self) -> None:
        self.signatures.clear()

    async def bedrock(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if (denied := self._aws_auth(request, raw)) is not None:
            return denied
        try:
            body = json.loads(raw)
        except ValueError:
            return error_response("bedrock", 400, None, _BEDROCK_MALFORMED.format("the body is not JSON"))
        if extraneous := [key for key in ("model", "stream") if key in body]:  # the path says them
            return error_response("bedrock", 400, None, _BEDROCK_MALFORMED.format(
                f"extraneous key [{extraneous[0]}] is not permitted"))  # fmt: skip
        if "anthropic_version" not in body:
            return error_response("bedrock", 400, None, _BEDROCK_MALFORMED.format(
                "#: required key [anthropic_version] not found"))  # fmt: skip
        stream = request.match_info["action"] == "invoke-with-response-stream"
        body = {**body, "model": request.match_info["model"], "stream": stream}
        framer = EventStream(AnthropicMessages) if stream else Sse(AnthropicMessages)
        return await self.provider.answer(request, AnthropicMessages, "bedrock", body, framer, "bedrock.messages")

    async def vertex(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._bearer(request, "goog-")) is not None:
            status = {"code": 401, "message": f"Request had invalid authentication credentials ({denied}).",
                      "status": "UNAUTHENTICATED"}  # fmt: skip
            return web.json_response({"error": status}, status=401)
        model, _, method = request.match_info["call"].rpartition(":")
        try:
            body = await request.json()
        except ValueError as exc:
            return error_response("vertex", 400, "invalid_request_error", str(exc))
        if "model" in body or "anthropic_version" not in body:
            message = (
                "model: Extra inputs are not permitted" if "model" in body else "anthropic_version: Field required"
            )
            return error_response("vertex", 400, "invalid_request_error", message)
        if (model, method) == ("count-tokens", "rawPredict"):
            return self.provider.counted(body, "vertex.count_tokens")
        if method not in ("rawPredict", "streamRawPredict"):
            return web.json_response({"error": {"code": 404, "message": f"unknown method {method!r}"}}, status=404)
        body = {**body, "model": model}
        self.provider.served[f"vertex.at:{request.match_info['project']}/{request.match_info['region']}"] += 1
        return await self.provider.answer(request, AnthropicMessages, "vertex", body, Sse(AnthropicMessages),
                                          "vertex.messages")  # fmt: skip

    async def foundry(self, request: web.Request) -> web.StreamResponse:
        """Claude in Microsoft Foundry: Anthropic's own API under /anthropic, with `x-api-key` or an Entra
        ID token (the same issuer as Azure's)."""
        if not request.headers.get("x-api-key") and self._bearer(request, "entra-") is not None:
            return error_response("anthropic", 401, "authentication_error", "invalid x-api-key")
        try:
            body = await request.json()
        except ValueError as exc:
            return error_response("anthropic", 400, "invalid_request_error", str(exc))
        return await self.provider.answer(request, AnthropicMessages, "anthropic", body, Sse(AnthropicMessages),
                                          "foundry.messages")  # fmt: skip

    async def azure(self, request: web.Request) -> web.StreamResponse:
        if not request.query.get("api-version"):
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        if not request.headers.get("api-key") and self._bearer(request, "entra-") is not None:
            return web.json_response({"error": {"code": "401", "message": _AZURE_DENIED}}, status=401)
        try:
            body = await request.json()
        except ValueError as exc:
            return error_response("azure", 400, "invalid_request_error", str(exc))
        deployment = request.match_info.get("deployment")
        if deployment is None:
            fmt, label = OpenAIResponses, "azure.responses"
        else:
            fmt, label = AzureChat, "azure.chat.completions"
            self.provider.served[f"azure.deployment:{deployment}"] += 1
            body = {**body, "model": body.get("model") or deployment}
        return await self.provider.answer(request, fmt, "azure", body, Sse(fmt), label)

    async def google_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" or \
                str(form.get("assertion", "")).count(".") != 2:  # fmt: skip
            return web.json_response({"error": "invalid_grant", "error_description": "expected a JWT"}, status=400)
        return web.json_response({"access_token": self._issue("goog-"), "expires_in": 3600, "token_type": "Bearer"})

    async def azure_token(self, request: web.Request) -> web.Response:
        resource = request.query.get("resource", "")
        if not request.headers.get("x-identity-header") or not resource:
            return web.json_response({"error": "invalid_request", "message": "X-IDENTITY-HEADER and resource"}, 400)
        token = self._issue("entra-")
        expires = str(int(time.time()) + 3600)
        return web.json_response({"access_token": token, "expires_on": expires, "resource": resource,
                                  "token_type": "Bearer"})  # fmt: skip

    def _issue(self, prefix: str) -> str:
        token = f"{prefix}{len(self.issued) + 1}"
        self.issued.add(token)
        self.provider.served[f"token.{prefix.rstrip('-')}"] += 1
        return token

    def _bearer(self, request: web.Request, issued_form: str) -> str | None:
        """Why the request's bearer token is refused, or None: a token of the issuer's form must be one it issued."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not token.strip():
            return "no bearer token"
        if token.startswith(issued_form) and token not in self.issued:
            return "a token this issuer did not issue"
        return None

    def _aws_auth(self, request: web.Request, body: bytes) -> web.Response | None:
        """A refusal, or None for a bearer API key or a well-formed (and, with TEST_AWS_KEY, valid) SigV4."""
        auth, date = request.headers.get("authorization", ""), request.headers.get("x-amz-date", "")
        if auth.startswith("Bearer ") and auth[7:].strip():
            self.provider.served["bedrock.bearer"] += 1
            return None
        match = _SIGV4.fullmatch(auth)
        if match is None or not _AMZ_DATE.fullmatch(date):
            return error_response("bedrock", 403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        key_id, day, region, service, signed, signature = match.groups()
        names = signed.split(";")
        if service != "bedrock" or not date.startswith(day) or "host" not in names or "x-amz-date" not in names:
            return error_response("bedrock", 403, "InvalidSignatureException", "Credential should be scoped to a valid "
                                  "service, date and the host and x-amz-date headers")  # fmt: skip
        verified = key_id == TEST_AWS_KEY[0]
        if verified and not _valid(request, body, names, region, signature, date):
            return error_response("bedrock", 403, "InvalidSignatureException", "The request signature we calculated "
                                  "does not match the signature you provided.")  # fmt: skip
        self.signatures.append({"date": date, "signature": signature, "verified": verified, "region": region})
        del self.signatures[:-_REMEMBERED]
        return None


def _valid(request: web.Request, body: bytes, names: list[str], region: str, signature: str, date: str) -> bool:
    """Whether TEST_AWS_KEY signed exactly this request (botocore's SigV4, timestamp = X-Amz-Date)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    headers = {name: request.headers.get(name, "") for name in names}
    signed = AWSRequest(method=request.method, url=f"http://{request.host}{request.raw_path}", data=body,
                        headers=headers)  # fmt: skip
    signed.context["timestamp"] = date
    signer = SigV4Auth(Credentials(*TEST_AWS_KEY), "bedrock", region)
    canonical = signer.canonical_request(signed)
    return signer.signature(signer.string_to_sign(signed, canonical), signed) == signature
