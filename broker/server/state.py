"""What the broker knows about each worker and each request. Plain records; the verbs live on the
Fleet (workers) and the Flow (requests)."""

from __future__ import annotations

import enum
import math
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from ..protocol import Spent, Submit

if TYPE_CHECKING:
    from .requestlog import AttemptLine
    from .resumes import Rescue


class WorkerState(enum.Enum):
    STARTING = "starting"  # asked of the zygote, not READY yet: nothing is routed to it
    READY = "ready"
    HUNG = "hung"  # its heartbeats stopped: asked for its stacks, killed once they had time to come; no new work
    CONDEMNED = "condemned"  # killed or retiring: never gets new work


class Reason(enum.StrEnum):
    """Why a worker was killed (or a request given up); counted in stats."""

    FIRST_EVENT = "first_event_timeout"
    STALE = "stale_timeout"
    DEADLINE = "deadline"
    HEARTBEAT = "heartbeat_lost"
    CRASH = "crashed"
    MEMORY = "memory_limit"
    STARTUP = "startup_timeout"
    ABORT = "abort_timeout"
    RECYCLE = "max_requests"
    PROTOCOL = "protocol_mismatch"
    SHUTDOWN = "shutdown"
    SCALE_DOWN = "scale_down"
    HEADERS = "headers_timeout"  # no response headers within headers_timeout: the worker is killed
    HTTP_429 = "http_429"  # not a kill: the provider answered 429; retried within the call's budget
    HTTP_5XX = "http_5xx"  # not a kill: the provider answered 500, 502, 503, 504 or 529; retried likewise
    HTTP_RETRYABLE = "http_retryable"  # not a kill: a 408 or 409, or any status with x-should-retry: true
    CONNECTION = "provider_connection"  # not a kill: the provider dropped an unseen request; retried
    INCOMPLETE = "stream_incomplete"  # not a kill: an unseen stream ended without its terminal event; retried
    ERROR_EVENT = "error_event"  # not a kill: the stream ended in an overloaded_error/api_error event; retried
    NEIGHBOUR = "killed_with_a_stalled_neighbour"  # not a kill reason: another stream of its worker stalled

    @property
    def is_stall(self) -> bool:
        return self in (Reason.HEADERS, Reason.FIRST_EVENT, Reason.STALE, Reason.HEARTBEAT)

    @property
    def is_kill(self) -> bool:
        """Whether the attempt's worker was killed for it (or with it)."""
        return self not in _NOT_KILLS


_NOT_KILLS = frozenset({Reason.HTTP_429, Reason.HTTP_5XX, Reason.HTTP_RETRYABLE, Reason.CONNECTION, Reason.INCOMPLETE,
                        Reason.ERROR_EVENT, Reason.DEADLINE})  # fmt: skip


@dataclass(eq=False, slots=True)
class Worker:
    ident: bytes
    profile: str
    slot: int
    generation: int
    spawned_at: float
    capacity: int = 1
    token: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)  # proves READY/HEARTBEAT
    state: WorkerState = WorkerState.STARTING
    pid: int = 0
    kill_at: float = 0.0  # when HUNG: when it is killed (its stacks read first)
    proc: psutil.Process | None = None  # taken when forked: killing it never hits a recycled pid
    zygote: int = 0  # which zygote generation forked it (a replaced zygote no longer reports its exit)
    last_beat: float = 0.0
    idle_since: float = 0.0
    served: int = 0
    requests: dict[int, Request] = field(default_factory=dict)
    queued_free: bool = False  # whether it sits in its group's free-slot queue
    group: str = ""  # its worker group: the profile, or `profile.deployment` (routes.py)
    warm: bool = False  # runs a first call once READY (it replaces one killed with requests): taken as one that served

    @property
    def free(self) -> int:
        return self.capacity - len(self.requests) if self.state is WorkerState.READY else 0


@dataclass(eq=False, slots=True)
class Request:
    key: int  # the broker's own id, used with workers
    client: bytes  # the client's ZeroMQ identity
    crid: int  # the client's id for it
    submit: Submit
    payload: bytes
    profile: str
    first_event_timeout: float
    stale_timeout: float
    deadline_at: float
    accepted_at: float
    attempt: int = 0
    worker: Worker | None = None
    sent_at: float = 0.0
    last_event_at: float | None = None
    ending: bool = False  # this attempt's stream said it finished (Kind.ENDING): not watched for staleness
    headers_at: float | None = None  # when this attempt's response headers arrived
    headers_timeout: float = math.inf
    delivered: int = 0
    head: bytes | None = None
    not_before: float = 0.0
    history: list[str] = field(default_factory=list)
    cancelled: bool = False
    abort_at: float = 0.0
    queued: bool = False  # whether it waits in its profile's queue
    # Limits of its own (its deadline; a time limit the caller set tighter than the pool's): when one
    # passes on a worker that carries other streams, this one is aborted alone.
    own_limits: set[Reason] = field(default_factory=lambda: {Reason.DEADLINE})
    group: str = ""  # the worker group (deployment) of its latest attempt
    failed_on: set[str] = field(default_factory=set)  # groups an attempt of it failed on
    # Its targets (routes.py): the chain, its own profile first; those it went to; where a
    # context-length refusal goes; the model of the current one ("": its own); attempts there.
    hops: list[tuple[str, str]] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)
    context: tuple[str, str] | None = None
    model: str = ""
    target_attempts: int = 0
    rerouted: str = ""  # how the current target came to run it: fallback, context-fallback ("": its own)
    # (code, ErrorInfo, where it ran: a Served header's fields) of its own target's first provider error
    first_error: tuple[str, bytes, tuple[int, str, str, str, str]] | None = None
    tries: list[str] = field(default_factory=list)  # each failed attempt, `group:reason`
    probing: bool = False  # its current attempt is its deployment's half-open circuit probe
    rescue: Rescue | None = None  # a stream opted in to be continued if it breaks after output (resumes.py)
    # The attempt's mid-stream error event (its EVENT payload), not forwarded while the broker decides
    # whether the call is retried or continued; the caller gets it if the call ends. `held_end`: the
    # RESULT of that stream, where its worker ended it there (the caller's own SDK raises at the event).
    held: bytes | None = None
    held_end: bytes | None = None
    # With a request log or traces: when this attempt's first event came, how each attempt went, the
    # attempts already told of, and the OpenTelemetry spans of the request and of its current attempt.
    first_event_at: float | None = None
    attempts: list[AttemptLine] = field(default_factory=list)
    attempts_told: int = 0
    span: Any = None
    attempt_span: Any = None
    spent: Spent | None = None  # what the provider reported of this attempt's answer so far (Kind.USAGE)
    genai: dict[str, Any] | None = None  # with traces: its gen_ai.request.* attributes (and content, opted in)
    output: Any = None  # with message content opted in: this attempt's answer as passed on (genai.Output)
