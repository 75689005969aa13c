"""The wire protocol shared by client, broker and worker.

Every message is a multipart ZeroMQ message of two or three frames:

    [kind (1 byte)] [header (msgpack, per-kind Struct, array-like)] [payload (opaque bytes)]

or, from a worker to the broker and from the broker to a caller, of several such records of three
frames each (the payload empty where there is none): what one call produced within a moment (its head
with its first events; its last events, usage, ending and result) costs one send, one wake-up of each
process and one poll pass, instead of one per record (`Codec.records`).

The broker decodes only the kind and the header; payloads (the SDK call's arguments,
the provider's event JSON, results and error details) are forwarded untouched.
Field order of the array-like headers is the contract: fields are only ever appended.

Client <-> broker (frontend):  SUBMIT, CANCEL, STATS, PING  ->   <- EVENT, RESULT, ERROR, STATS
Broker <-> worker (backend):   RUN, ABORT             ->   <- READY, HEARTBEAT, HEAD,
                                                              PROGRESS, EVENT, RESULT, ERROR, USAGE
"""

from __future__ import annotations

import enum
import urllib.parse
from typing import Any

import msgspec

PROTOCOL_VERSION = 10
MAX_HEADER_BYTES = 4096


class Code(enum.StrEnum):
    """What an ERROR means. Provider codes come from the worker, the rest from the broker or client."""

    PROVIDER_STATUS = "provider_status"  # HTTP 4xx/5xx from the provider, after the pool's retries
    PROVIDER_STREAM = "provider_stream"  # an `error` event in the middle of a stream
    PROVIDER_CONNECTION = "provider_connection"
    PROVIDER_TIMEOUT = "provider_timeout"  # the SDK's own HTTP timeout
    STREAM_INCOMPLETE = "stream_incomplete"  # the stream ended without its terminal event: never a success
    BAD_REQUEST = "bad_request"  # unknown profile or method, bad arguments, refused override
    CONFIG = "config"  # the worker could not build its SDK client (e.g. no API key)
    STALLED = "stalled"  # the stream stopped producing events after the caller saw some
    WORKER_LOST = "worker_lost"  # the worker died after the caller saw output
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"  # every attempt stalled or lost its worker
    DEADLINE = "deadline"
    SATURATED = "saturated"  # the pool's queue, or this connection's share of it, is full
    RATE_LIMITED = "rate_limited"  # over this connection's client_rate
    CANCELLED = "cancelled"
    SHUTTING_DOWN = "shutting_down"
    PROTOCOL = "protocol"  # a malformed, oversized or unknown message
    INTERNAL = "internal"


class Continuation(enum.StrEnum):
    """How a broken stream's continuation failed: worker -> broker only (the caller gets the error the
    stream first broke with, and why it was not continued)."""

    PREFILL_REFUSED = "prefill_refused"  # the provider refused the assistant prefill (a 400): replay instead
    NOT_CONTINUABLE = "not_continuable"  # what was delivered cannot be continued (thinking, tool use, n > 1, ...)
    REPLAY_DIVERGED = "replay_diverged"  # the replayed answer did not reproduce what the caller had


class Kind(enum.IntEnum):
    SUBMIT = 1
    CANCEL = 2
    STATS = 3
    PING = 4
    EVENT = 10
    RESULT = 11
    ERROR = 12
    HEAD = 13
    PROGRESS = 14
    ENDING = 15
    USAGE = 16
    RUN = 20
    ABORT = 21
    READY = 30
    HEARTBEAT = 31


class Submit(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A call to run. `model` and `stream` are copied out of the payload so that the
    broker can pick time limits without parsing it."""

    rid: int
    profile: str = ""
    model: str = ""
    stream: bool = False
    first_event_timeout: float | None = None
    stale_timeout: float | None = None
    deadline: float | None = None
    max_attempts: int | None = None
    read_timeout: float | None = None  # the SDK's per-call read timeout: caps the first-event and stale limits
    fallbacks: list[tuple[str, str]] | None = None  # the caller's own (profile, model) chain; "" = its own
    method: str = ""  # the SDK method or HTTP path, which names the operation in traces
    traceparent: str = ""  # the caller's trace context (W3C), when it has one: the pool's spans go under it
    caller: str = ""  # who the caller says it is, for accounting: a gateway's token, by name (never the token)


class Ref(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Header of messages that only name a request: CANCEL, STATS, PING, PROGRESS, ABORT."""

    rid: int


class Served(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Header of HEAD and RESULT: the request, and (from the broker to its caller) who answered it:
    after how many attempts, on which profile, deployment and model, and how it was rescued
    (`retry`, `deployment`, `fallback`, `context-fallback`; "" at the first attempt). A worker sends
    only the request id."""

    rid: int
    attempts: int = 0
    profile: str = ""
    deployment: str = ""
    model: str = ""  # the model asked of the provider ("" for a call that names none)
    rescue: str = ""

    def headers(self) -> list[tuple[str, str]]:
        """As the gateway and the shim say it on an answer: `x-isopool-profile`, `-deployment`,
        `-model`, `-attempts` and `-rescue` (those that are set)."""
        if not self.attempts:
            return []
        fields = ("profile", self.profile), ("deployment", self.deployment), ("model", self.model)
        fields += ("attempts", str(self.attempts)), ("rescue", self.rescue)
        return [(f"x-isopool-{name}", _header_value(value)) for name, value in fields if value]


def _header_value(value: str) -> str:
    """Printable ASCII as it is; anything else percent-encoded: the model is the caller's own string,
    and a control character or a letter outside ASCII cannot go into an HTTP header."""
    return value if value.isascii() and value.isprintable() else urllib.parse.quote(value, safe=_PRINTABLE)


_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class Event(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Header of real stream events: those of one read from the provider, or of the reads within the
    worker's `coalesce_ms` (the first event, and any after a pause, never held). The payload is a
    msgpack array of `[name, data]` pairs, `data` being the provider's own `data:` JSON, unparsed;
    `seq` numbers the first one. `error`
    (from a worker only): the batch is the provider's mid-stream error event, which the broker holds
    until it knows whether the call is retried or continued."""

    rid: int
    seq: int
    count: int = 1
    error: bool = False


class Error(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Header of an ERROR; the payload is an encoded `ErrorInfo`."""

    rid: int
    code: str
    attempts: int = 0  # the rest as in `Served`: where the request last ran (the broker fills them)
    profile: str = ""
    deployment: str = ""
    model: str = ""
    rescue: str = ""


# The most tokens one attempt is billed of each kind: a trillion, far past any model's context. A provider (or a
# proxy) that reports more is wrong or hostile; its count, cut to this, can neither overflow a message nor a tally.
MAX_TOKENS = 10**12


class Spent(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Header of USAGE (worker -> broker): what the provider has reported so far of one attempt's answer,
    sent whenever it changes (a few times an attempt): its token usage (`input_tokens` counts every
    prompt token, those read from or written to the cache included), the response's id and model and
    its finish reasons. Sent as it comes rather than with the end: a stalled attempt's worker is
    SIGKILLed and sends no end, yet its provider billed what it reported. A count is None until the provider
    reports it (a Chat stream without include_usage reports none; OpenAI never reports a cache write): not 0."""

    rid: int
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    response_id: str = ""
    response_model: str = ""
    finish_reasons: list[str] = []


class Run(msgspec.Struct, array_like=True, frozen=True, gc=False):
    rid: int
    attempt: int = 1
    model: str = ""  # a fallback's model, to send in place of the call's own ("": the call's)
    traceparent: str = ""  # the attempt's span (W3C trace context), sent on to the provider


class Ready(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A worker's first message: nothing is routed to it before."""

    worker: str
    pid: int
    version: int
    capacity: int = 1
    token: str = ""  # the secret the broker gave this worker at spawn: READY and HEARTBEAT prove who sent them


class Heartbeat(msgspec.Struct, array_like=True, frozen=True, gc=False):
    worker: str
    token: str


HEADERS: dict[Kind, type[msgspec.Struct]] = {
    Kind.SUBMIT: Submit,
    Kind.CANCEL: Ref,
    Kind.STATS: Ref,
    Kind.PING: Ref,
    Kind.EVENT: Event,
    Kind.RESULT: Served,
    Kind.ERROR: Error,
    Kind.HEAD: Served,
    Kind.PROGRESS: Ref,
    Kind.USAGE: Spent,
    Kind.ENDING: Ref,  # the stream said it finished: what may follow is `[DONE]` or the close (worker/sse.py GRACE)
    Kind.RUN: Run,
    Kind.ABORT: Ref,
    Kind.READY: Ready,
    Kind.HEARTBEAT: Heartbeat,
}
KIND_BYTES: dict[Kind, bytes] = {kind: bytes([kind]) for kind in Kind}
_KINDS: dict[int, Kind] = {kind.value: kind for kind in Kind}  # ~30 ns a lookup; calling Kind(n): ~400 ns


# Payloads. The broker never decodes these, except the ones it writes itself.


TICK = "isopool.tick"  # the event name of a timed call's ticks


class CachedDetails(msgspec.Struct, gc=False):
    """OpenAI's `prompt_tokens_details` (Chat Completions) or `input_tokens_details` (Responses)."""

    cached_tokens: int | None = None


class Usage(msgspec.Struct, gc=False):
    """Token usage as any of the three APIs reports it (Anthropic and Responses: input/output;
    Chat Completions: prompt/completion); -1 where not given. Cached input: Anthropic's
    `cache_read_input_tokens` (its `input_tokens` leaves out what was read from or written to
    the cache), OpenAI's `cached_tokens` in the details (a part of its input count)."""

    input_tokens: int | None = -1  # None: Anthropic's message_delta may say so
    output_tokens: int | None = -1
    prompt_tokens: int | None = -1
    completion_tokens: int | None = -1
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    prompt_tokens_details: CachedDetails | None = None
    input_tokens_details: CachedDetails | None = None

    @property
    def output(self) -> int:
        return max(_given(self.output_tokens), _given(self.completion_tokens))

    @property
    def input(self) -> int:
        """All the prompt's tokens, cached ones included."""
        own = _given(self.input_tokens)
        anthropic = own + (self.cache_read_input_tokens or 0) + (self.cache_creation_input_tokens or 0)
        return max(anthropic if own >= 0 else -1, _given(self.prompt_tokens))

    @property
    def cached(self) -> int:
        """Input tokens read from the server's cache (-1: not reported)."""
        details = self.prompt_tokens_details or self.input_tokens_details
        given = self.cache_read_input_tokens if details is None else details.cached_tokens
        return -1 if given is None else given

    @property
    def cache_creation(self) -> int:
        """Input tokens written to the cache (Anthropic only; -1: not reported)."""
        return -1 if self.cache_creation_input_tokens is None else self.cache_creation_input_tokens


def _given(count: int | None) -> int:
    return -1 if count is None else count


class Tick(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True, gc=False):
    """What a timed call's worker sends for each read of the stream instead of its events:
    when the bytes arrived (`time.monotonic_ns()`, the same clock in every process of the
    machine), how many of them were output (content deltas), and, once known, the usage
    and a mid-stream error. The first tick is the response head, with the send time."""

    t: int
    tokens: int = 0
    sent: int = 0  # first tick only: when the worker sent the request
    status: int = 0  # first tick only: the HTTP status
    output_tokens: int = -1  # from the provider's usage, when it reports it
    input_tokens: int = -1
    error: str = ""  # the type of a mid-stream error event, e.g. overloaded_error
    cached_tokens: int = -1  # input tokens the server read from its cache, when it reports them
    cache_creation_tokens: int = -1  # input tokens it wrote to its cache (Anthropic)


class Call(msgspec.Struct, frozen=True, tag="sdk"):
    """What a worker should run: an SDK method path such as `messages.create` and its kwargs."""

    method: str
    kwargs: dict[str, Any] = {}


class HttpCall(msgspec.Struct, frozen=True, tag="http"):
    """An HTTP request the caller's own SDK built, for the worker to send with its own client:
    `path` (with query) is relative to the profile's base URL; credentials are the worker's."""

    method: str
    path: str
    headers: list[tuple[str, str]] = []
    body: bytes = b""
    base_url: str = ""  # per-request upstream and key: refused unless the pool allows overrides
    api_key: str = ""
    # where a cloud client said its data goes (region, project, endpoint): another than its profile's is
    # refused unless the pool allows overrides (broker/shim/clouds.py, worker/clouds/__init__.py)
    placement: dict[str, str] = {}

    def __repr__(self) -> str:  # never show the key
        return (
            f"HttpCall({self.method} {self.path}, base_url={self.base_url!r}, api_key={'***' if self.api_key else ''})"
        )


def path_problem(path: str) -> str | None:
    """Why an HttpCall's `path` could leave its base URL, or None. Dot segments and backslashes are
    refused however often encoded: an upstream (or a proxy before it) that decodes `%2e%2e` or
    `..%2f` would resolve them above the API's root."""
    route = decoded = path.partition("?")[0]
    while (once := urllib.parse.unquote(decoded)) != decoded:  # each pass shortens it
        decoded = once
    if not route.startswith("/") or decoded.startswith("//") or "#" in path:
        return f"path {route!r} must be a plain absolute path under the profile's base URL"
    if "\\" in decoded or any(segment in (".", "..") for segment in decoded.split("/")):
        return f"path {route!r} has dot segments or backslashes (perhaps encoded): send a plain path"
    return None


class TimedCall(msgspec.Struct, frozen=True, tag="timed"):
    """A load test's call: `http` is sent as it is, and the worker sends back a `Tick` per read
    instead of the events. It ends a stream that produced nothing for `stale_timeout` (or
    before its first event for `first_event_timeout`) itself, with STALLED, so that one stall
    does not take the other streams of its worker down with it; the broker's watchdog, set a
    little later, remains the backstop for a worker that hangs."""

    http: HttpCall
    first_event_timeout: float
    stale_timeout: float


CONTINUED_HEADER = "x-isopool-continued"  # in a continuation's HEAD (never forwarded): the strategy it runs


class Resume(msgspec.Struct, frozen=True, tag="resume"):
    """A broken stream to continue: the original encoded call and the event batches the caller
    received (each an EVENT payload as the worker sent it), both as the broker held them, unparsed.
    The worker tries the `strategies` ("prefill", "replay") in order and says in its HEAD which it used."""

    call: msgspec.Raw
    delivered: list[msgspec.Raw]
    strategies: list[str]


class Response(msgspec.Struct, frozen=True):
    """HTTP status, headers and body of a finished call (body empty after a stream); at its end,
    how many malformed events (a `data:` line that is not JSON) the worker dropped from the stream."""

    status: int
    headers: list[tuple[str, str]] = []
    body: bytes = b""
    malformed_events: int = 0


class ErrorInfo(msgspec.Struct, frozen=True):
    """Everything the caller needs to raise a typed error.

    `code` says who failed and how (see `broker.errors`); `status`, `body` and
    `headers` are set for provider HTTP errors so that the SDK's own class can be
    rebuilt; `delivered` counts the events the caller had already received."""

    code: str
    message: str
    status: int | None = None
    body: bytes | None = None
    headers: list[tuple[str, str]] = []
    delivered: int = 0
    attempts: int = 0
    error_type: str = ""
    failure: str = ""  # what the provider's error body says, where a fallback needs it: context_length, content_filter
    tried: list[str] = []  # the pool's own errors: each failed attempt, as `group:reason`
    rescue: str = ""  # why a broken stream could not be continued (with `continue_streams`)


class BrokerReady(msgspec.Struct, frozen=True):
    """An embedded pool's broker child says where it serves: the first line of its stdout."""

    url: str  # the frontend
    pid: int
    http: str = ""  # the HTTP gateway's base URL, with the `http` setting
    metrics: str = ""  # the Prometheus endpoint, with the `metrics` setting


class Listening(msgspec.Struct, frozen=True):
    """An owned HTTP child (the gateway, the metrics endpoint, the fake provider) says where it listens."""

    url: str


# The answer to STATS (`isopool stats`, the metrics child, the batch runner and the bench read it).
# Field order is the order of `isopool stats --json`: fields are only ever appended.

# upper bounds in seconds of the broker's latency histograms; the last bucket is open-ended
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class HistogramSnapshot(msgspec.Struct, frozen=True):
    count: int
    mean: float | None
    p50: int | float | None  # quantiles are bucket upper bounds (some of BUCKETS are ints)
    p99: int | float | None
    buckets: dict[str, int]  # "le_<bound>" for each of BUCKETS, then "inf"


class WorkerSnapshot(msgspec.Struct, frozen=True):
    ident: str
    profile: str
    pid: int  # 0 until the zygote reports the fork
    state: str  # starting, ready, condemned, or busy while it carries requests
    requests: list[int]
    age: float
    served: int
    rss: int
    deployment: str = ""  # of its profile ("": a profile without deployments)


class StreamSnapshot(msgspec.Struct, frozen=True):
    """A request in flight, as `isopool top` lists it (the oldest first)."""

    request: int  # the broker's id, as in WorkerSnapshot.requests
    profile: str
    model: str
    worker: str  # "" while it waits (queued, or backing off before a retry)
    attempt: int
    age: float  # seconds since it was accepted
    since_event: float | None  # seconds since its latest event (None: none yet on this attempt)
    delivered: int  # events its caller has had


class Happening(msgspec.Struct, frozen=True):
    """A recent kill, retry or fallback, as `isopool top` lists it (the newest first)."""

    ago: float  # seconds
    what: str  # kill, retry, fallback
    detail: str


class CircuitSnapshot(msgspec.Struct, frozen=True):
    """The circuit breaker of one deployment and model (broker/server/circuits.py)."""

    state: str  # closed, open, half_open
    failures: int  # in a row, while closed
    until_in: float  # while open: seconds before a probe may go
    probes: int
    opened: int  # times it opened
    transitions: list[str]  # the last few states it went to, oldest first


class Tokens(msgspec.Struct, frozen=True):
    """Tokens the providers reported (`input` counts every prompt token: those read from and written to
    the cache too), over `attempts` attempts, and their `cost` with a price table (setting `prices`)."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    attempts: int = 0
    cost: float | None = None


class Snapshot(msgspec.Struct, frozen=True):
    pid: int
    uptime: float
    frontend: str
    zygote_pid: int
    queued: dict[str, int]  # by profile
    in_flight: int
    connections: int
    draining: bool
    allow_overrides: bool
    capacity: dict[str, int]  # by profile: max_workers x concurrency
    workers: list[WorkerSnapshot]
    requests: dict[str, int]  # accepted, ok, error:<code>, cancelled
    kills: dict[str, int]  # by reason
    stalls: dict[str, int]  # by reason (the stall kinds)
    retries: int
    spawns: int
    respawns: int
    zygote_restarts: int
    exits: dict[str, int]  # by exit status
    rejected: dict[str, int]  # malformed or refused messages, by code
    latency: HistogramSnapshot
    first_event: HistogramSnapshot
    retries_by_reason: dict[str, int] = {}  # http_429, http_5xx, provider_connection, headers_timeout, ...
    fallbacks: dict[str, int] = {}  # calls moved to another target, by "from>to" (profile/model)
    rescued: dict[str, int] = {}  # calls answered after a failure, by how: retry, deployment, fallback, ...
    circuits: dict[str, CircuitSnapshot] = {}  # those not closed and healthy, by `group/model` (group: a deployment)
    continuations: dict[str, int] = {}  # continuation attempts, "<strategy>:<outcome>" (ok, refused, diverged, ...)
    events: int = 0  # events delivered to callers
    streams: list[StreamSnapshot] = []  # the oldest requests in flight (at most STREAMS_SHOWN)
    recent: list[Happening] = []  # the latest kills, retries and fallbacks (at most RECENT_KEPT)
    request_log_lost: int = 0  # request log lines not written (a full disk, a writer behind)
    tokens: dict[str, Tokens] = {}  # by "profile/model" (the model that answered)
    tokens_by_client: dict[str, Tokens] = {}  # by client connection (a hash of it, as the request log names it)
    prices: str = ""  # the price table the costs come from (its path, and its date when it gives one)
    tokens_by_caller: dict[str, Tokens] = {}  # by the caller a request named (`Submit.caller`: a gateway token)
    messages: dict[str, int] = {}  # ZeroMQ messages on each hop: from_callers, to_workers, from_workers, to_callers


# Request headers that never leave the caller's process: credentials (a worker adds its
# own key) and those that frame the HTTP exchange itself (the host, the body's length, the
# hop-by-hop ones, `Proxy-*`), which each HTTP client sets for its own connection: forwarded,
# they would point the worker's request, with the pool's key, elsewhere or smuggle a second one.
# (with AWS's signing headers: a caller's SigV4 signature never goes upstream; the worker signs)
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "proxy-authorization", "x-amz-date",
                                "x-amz-security-token", "x-amz-content-sha256"})  # fmt: skip
FRAMING_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "keep-alive",
     "proxy-connection"}
)  # fmt: skip


def is_framing_header(name: str) -> bool:
    """One of FRAMING_HEADERS, or any `Proxy-*` (none of them is meant for the provider)."""
    name = name.lower()
    return name in FRAMING_HEADERS or name.startswith("proxy-")


def is_local_header(name: str) -> bool:
    """A header a client (the shim, the gateway) never forwards to a worker."""
    return name.lower() in CREDENTIAL_HEADERS or is_framing_header(name)


def without_bearer(value: str) -> str:
    """An Authorization value's credentials without their `Bearer` scheme, which may be written in any
    case and followed by more than one space (RFC 9110, 11.1 and 11.4); any other value as it is."""
    scheme, space, credentials = value.partition(" ")
    return credentials.lstrip(" ") if space and scheme.lower() == "bearer" else value


def split(frames: list[bytes]) -> list[list[bytes]]:
    """The records of a message, each its own frames (one record of 2 or 3 frames, or several of 3)."""
    return [frames] if len(frames) <= 3 else [frames[at : at + 3] for at in range(0, len(frames), 3)]


class ProtocolError(ValueError):
    """A message that does not follow this protocol; it is answered and dropped."""


class Codec:
    """Encoders and decoders built once per socket owner. Not thread-safe: one per thread."""

    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._headers = {kind: msgspec.msgpack.Decoder(t) for kind, t in HEADERS.items()}
        self._call = msgspec.msgpack.Decoder(Call | HttpCall | TimedCall | Resume)
        self._response = msgspec.msgpack.Decoder(Response)
        self._error = msgspec.msgpack.Decoder(ErrorInfo)
        self._snapshot = msgspec.msgpack.Decoder(Snapshot)

    def encode(self, obj: Any) -> bytes:
        return self._enc.encode(obj)

    def frames(self, kind: Kind, header: msgspec.Struct, payload: bytes | None = None) -> list[bytes]:
        if payload is None:
            return [KIND_BYTES[kind], self._enc.encode(header)]
        return [KIND_BYTES[kind], self._enc.encode(header), payload]

    def parse(self, frames: list[bytes]) -> tuple[Kind, Any, bytes]:
        """Decode kind and header; raise ProtocolError for anything malformed."""
        if len(frames) not in (2, 3):
            raise ProtocolError(f"expected 2 or 3 frames, got {len(frames)}")
        kind_frame, header = frames[0], frames[1]
        if len(kind_frame) != 1:
            raise ProtocolError("kind frame must be one byte")
        kind = _KINDS.get(kind_frame[0])
        if kind is None:
            raise ProtocolError(f"unknown message kind {kind_frame[0]}")
        if len(header) > MAX_HEADER_BYTES:
            raise ProtocolError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            decoded = self._headers[kind].decode(header)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"bad {kind.name} header: {exc}") from None
        return kind, decoded, frames[2] if len(frames) == 3 else b""

    def records(self, frames: list[bytes]) -> list[tuple[Kind, Any, bytes]]:
        """Decode a message of one record (as `parse`) or of several, three frames each."""
        if len(frames) > 3 and len(frames) % 3:
            raise ProtocolError(f"expected records of 3 frames, got {len(frames)} frames")
        return [self.parse(record) for record in split(frames)]

    def call(self, payload: bytes) -> Call | HttpCall | TimedCall | Resume:
        return self._call.decode(payload)

    def response(self, payload: bytes) -> Response:
        return self._response.decode(payload)

    def error(self, payload: bytes) -> ErrorInfo:
        return self._error.decode(payload)

    def snapshot(self, payload: bytes) -> Snapshot:
        return self._snapshot.decode(payload)
