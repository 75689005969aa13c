"""The gateway's cloud-form routes: a caller's own cloud SDK class pointed at the gateway.

    anthropic.AnthropicBedrock(base_url=GATEWAY, aws_region="us-east-1", api_key=TOKEN)
    anthropic.AnthropicVertex(base_url=GATEWAY + "/v1", region=R, project_id="isopool", access_token=TOKEN)
    openai.AzureOpenAI(azure_endpoint=GATEWAY, api_version=V, api_key=TOKEN)

Each request keeps its cloud's form (the path names the model or deployment) and goes to the
profile of that kind (`default_profile`, or `x-isopool-profile`), whose workers sign it. Answers take
the cloud's wire form: Bedrock's streams are AWS event-stream frames again (its SDK decodes nothing
else), each relayed event a `chunk`, a failure after output an exception frame, and the gateway's
own errors Bedrock's `{"message"}` with `x-amzn-ErrorType`; Vertex answers as Anthropic does and
Azure as OpenAI does.
"""

from __future__ import annotations

import re

from .. import eventstream
from ..client.client import StreamEvent

# The path of each cloud's requests, as sent (a Bedrock model ARN's `/` is `%2F`), and the part of it
# its profile's base URL already holds. Vertex's: Anthropic's publisher only (the profile's token reaches
# every model of the project, Claude is what the pool relays and checks).
_FORMS = (
    ("bedrock", re.compile(r"/model/[^/]+/invoke(-with-response-stream)?"), ""),
    (
        "vertex",
        re.compile(r"/v1/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/[^/]+:(raw|streamRaw)Predict"),
        "/v1",
    ),
    ("azure", re.compile(r"/openai/.+"), "/openai"),
)
_STARTS = ("/model/", "/v1/projects/", "/openai/")  # what each of _FORMS starts with
_QUERIES = {"bedrock": False, "vertex": False, "azure": True}  # whose API has query parameters (api-version)
# Bedrock's error type per status, as its `x-amzn-ErrorType` header names it.
_BEDROCK_ERRORS = {400: "ValidationException", 401: "UnrecognizedClientException", 403: "AccessDeniedException",
                   408: "ModelTimeoutException", 413: "ValidationException", 429: "ThrottlingException",
                   503: "ServiceUnavailableException", 504: "ModelTimeoutException"}  # fmt: skip


def cloud_form(raw_path: str, target: str) -> tuple[str, str] | None:
    """(cloud kind, `target` relative to that kind's base URL) of a request in a cloud's own form, else None.
    `raw_path` and `target` (with its query) are as the caller sent them, not percent-decoded."""
    if not raw_path.startswith(_STARTS):  # a first-party request, most of them: no pattern to try
        return None
    for kind, pattern, held in _FORMS:
        if pattern.fullmatch(raw_path):
            return kind, target[len(held) :]
    return None


def query_problem(kind: str, target: str) -> str | None:
    """Why a cloud-form request's query is refused: Bedrock's and Vertex's APIs take none, and one the
    workers sign (`X-Amz-Security-Token=...`) is the caller's to forge."""
    if "?" in target and not _QUERIES.get(kind, True):
        return f"{kind}'s API takes no query parameters: drop them"
    return None


def bedrock_error(status: int, message: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Bedrock's error body and header for an error the gateway answers itself."""
    kind = _BEDROCK_ERRORS.get(status, "InternalServerException")
    return {"message": message}, [("x-amzn-ErrorType", f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/")]


def frames(events: list[StreamEvent]) -> bytes:
    """Relayed events in Bedrock's stream: a `chunk` frame of each one's JSON, as one write."""
    return b"".join([eventstream.chunk(event.data) for event in events])


def exception_frame(message: str, timeout: bool) -> bytes:
    """A failure after output in Bedrock's stream: an exception frame, which the SDK raises as an error event."""
    return eventstream.exception("modelTimeoutException" if timeout else "internalServerException", message)


STREAM_HEADERS = (("content-type", eventstream.CONTENT_TYPE),)
