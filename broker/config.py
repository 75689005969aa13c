"""Pool configuration: a TOML file, then `ISOPOOL_<SETTING>` environment variables, then
keyword arguments, each overriding the one before. A bad setting is a `ConfigError`
at start that names the setting.

Providers are named profiles. Two exist by default, `anthropic` and `openai`, which
leave `base_url` and the key to the SDKs themselves, so `ANTHROPIC_API_KEY`,
`ANTHROPIC_BASE_URL`, `OPENAI_API_KEY` and `OPENAI_BASE_URL` work exactly as with the
SDKs. Time limits resolve per request, then per model glob, then per profile, then
globally. A profile may hold several deployments and name fallbacks (checked and resolved in
routes.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgspec

from .endpoints import listen_address
from .errors import ConfigError
from .extras import missing
from .protocol import Submit
from .routes import check_routes, matching

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the default: clients that know no better refuse larger requests
# A stream's events are held at most this long (coalesce_ms): a fifth of the shortest stale_timeout a
# request may set (request_min_timeout's default), so held events never look like a stall.
MAX_COALESCE_MS = 50.0
ZYGOTE_BOOT_TIMEOUT = 60.0  # importing both SDKs takes ~1-2 s here; far longer means the zygote is stuck
# The broker's own start (its imports, sockets, the gateway's): ~0.5 s here, seconds on a loaded machine. A worker's
# startup_timeout may be set tighter than that, so it bounds the broker's start only when it is longer.
BROKER_BOOT_TIMEOUT = 30.0
# The shortest heartbeat_interval: a worker idle for 2 intervals counts as silent (flow.py), and below ~10 ms the
# GIL's switch interval (5 ms) and a busy broker's loop alone exceed that; the beats would also flood the broker.
MIN_HEARTBEAT_INTERVAL = 0.01
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Range(NamedTuple):
    """Where a numeric setting may lie. Always finite: nan passes every `<=` check (a stale_timeout of nan never
    fires), and settings reach the broker as JSON, where nan and inf become null (a crash at start)."""

    low: float
    high: float = math.inf
    exclusive: bool = False  # low itself is refused: > low

    def allows(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (value > self.low if self.exclusive else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        if self.high < math.inf:
            return f"within {self.low:g}..{self.high:g}"
        return f"{'>' if self.exclusive else '>='} {self.low:g}"


# Every number of Settings, Profile, Deployment and ModelRule by name (a name means the same at every scope).
RANGES = {
    # 0 would make each meaningless: an instant timeout, a circuit never closed, a deployment never chosen.
    **dict.fromkeys(("first_event_timeout", "stale_timeout", "deadline", "startup_timeout", "headers_timeout",
                     "circuit_cooldown", "circuit_cooldown_max", "circuit_probe_timeout", "request_min_timeout",
                     "request_max_timeout", "idle_timeout", "gateway_read_timeout", "sdk_timeout", "weight"),
                    Range(0, exclusive=True)),
    # 0 means something: no backoff or wait, off, unlimited, never, or another setting's value (the README).
    **dict.fromkeys(("retry_backoff", "http_retry_backoff", "retry_after_max", "respawn_backoff_max", "drain_timeout",
                     "client_rate", "circuit_failures", "client_queue_limit", "client_burst",
                     "client_queue_bytes_limit", "max_requests_per_worker", "max_memory_per_worker_mb",
                     "continue_max_bytes", "request_log_max_bytes", "request_log_backups", "min_workers",
                     "spare_workers"), Range(0)),
    # 0 would refuse or stop everything: no attempt, no queue, no request fits, no worker.
    **dict.fromkeys(("heartbeat_misses", "max_attempts", "queue_limit", "client_buffer", "max_message_bytes",
                     "queue_bytes_limit", "request_max_attempts", "max_workers", "concurrency"), Range(1)),
    "heartbeat_interval": Range(MIN_HEARTBEAT_INTERVAL),
    "coalesce_ms": Range(0, MAX_COALESCE_MS),  # held events must not look like a stall
}  # fmt: skip


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Time limits in seconds; None means "inherit from the wider scope"."""

    first_event_timeout: float | None = None
    stale_timeout: float | None = None
    deadline: float | None = None


CONTINUE_STRATEGIES = ("prefill", "replay")  # how a stream broken after output may be continued (resumes.py)


class Target(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a fallback goes: a profile and a model; "" keeps the request's own."""

    profile: str = ""
    model: str = ""

    def __str__(self) -> str:
        return "/".join(filter(None, (self.profile, self.model))) or "(own)"


class ModelRule(Limits, frozen=True, forbid_unknown_fields=True):
    """A model glob's limits, and the fallbacks that replace the profile's for those models."""

    fallbacks: list[Target] | None = None  # None: the profile's
    context_fallback: Target | None = None
    continue_streams: list[str] | None = None  # how their broken streams are continued; None: the profile's


class Deployment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One key or base URL of a profile, with workers of its own; None inherits the profile's."""

    name: str
    base_url: str | None = None
    api_key_env: str | None = None
    default_headers: dict[str, str] = {}  # merged over the profile's
    weight: float = 1.0
    min_workers: int | None = None
    max_workers: int | None = None
    spare_workers: int | None = None


# A profile's kind -> the SDK package whose client it runs on (its family): the cloud kinds use the
# SDKs' own cloud clients (anthropic.AsyncAnthropicBedrock, ..., openai.AsyncAzureOpenAI).
FAMILIES = {"anthropic": "anthropic", "openai": "openai", "bedrock": "anthropic", "vertex": "anthropic",
            "azure": "openai", "foundry": "anthropic"}  # fmt: skip
# The settings of the cloud kinds, and the kinds each belongs to (set on another kind: a ConfigError).
CLOUD_SETTINGS = {
    "region": ("bedrock", "vertex"),
    "aws_profile": ("bedrock",),
    "project": ("vertex",),
    "credentials_file": ("vertex",),
    "endpoint": ("azure",),
    "api_version": ("azure",),
    "azure_deployments": ("azure",),
    "auth": ("azure", "foundry"),
    "resource": ("foundry",),
}


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One upstream: which SDK, where, with which key, how many workers and which limits."""

    kind: Literal["anthropic", "openai", "bedrock", "vertex", "azure", "foundry"]
    base_url: str | None = None
    api_key_env: str | None = None
    default_headers: dict[str, str] = {}
    sdk_timeout: float = 600.0
    min_workers: int = 1
    max_workers: int = 8
    spare_workers: int = 1
    concurrency: int = 1
    first_event_timeout: float | None = None
    stale_timeout: float | None = None
    deadline: float | None = None
    models: dict[str, ModelRule] = {}
    deployments: list[Deployment] = []  # none: one, named after the profile
    strategy: Literal["least-busy", "weighted", "ordered"] = "least-busy"
    fallbacks: list[Target] = []  # tried in order when this profile cannot answer
    context_fallback: Target | None = None  # a larger-context model, for a context-length 400
    fallback_on: list[str] = msgspec.field(default_factory=lambda: ["retryable", "silence", "stall", "open"])
    continue_streams: list[str] = []  # "prefill", "replay": a stream broken after output is continued; [] = off
    # The cloud kinds' own settings (CLOUD_SETTINGS); None leaves each to the cloud's environment variable
    # or credential chain, read in the worker.
    region: str | None = None  # bedrock: else AWS_REGION; vertex: else CLOUD_ML_REGION
    aws_profile: str | None = None  # bedrock: a profile of the AWS config files; else the default chain
    project: str | None = None  # vertex: else ANTHROPIC_VERTEX_PROJECT_ID, else the credentials'
    credentials_file: str | None = None  # vertex: a service-account JSON; else ADC (api_key_env: an access token)
    endpoint: str | None = None  # azure: https://RESOURCE.openai.azure.com; else AZURE_OPENAI_ENDPOINT
    api_version: str | None = None  # azure: else OPENAI_API_VERSION
    azure_deployments: dict[str, str] = {}  # azure: model -> deployment name; a model not in it is its own
    auth: Literal["key", "entra"] | None = None  # azure, foundry: "key" (api_key_env) or "entra" (azure-identity)
    resource: str | None = None  # foundry: the Foundry resource's name; else ANTHROPIC_FOUNDRY_RESOURCE (or base_url)

    @property
    def family(self) -> str:
        """The SDK this profile's client comes from: `anthropic` or `openai`."""
        return FAMILIES[self.kind]


def check_request_log(path: str, max_bytes: int, backups: int) -> None:
    """A request log the writer can append to without blocking, and that rotation bounds."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(f"setting request_log: the directory of {path!r} does not exist")
    with contextlib.suppress(FileNotFoundError):
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISBLK(mode):
            raise ConfigError(f"setting request_log: {path!r} is not a file (a pipe without a reader would hang "
                              "the broker's writer): name a file")  # fmt: skip
    if max_bytes and not backups:
        raise ConfigError("settings request_log_max_bytes and request_log_backups: a log rotated at a size keeps "
                          "at least 1 backup (with 0 it is never cut); or set request_log_max_bytes = 0")  # fmt: skip


# The first-party SDKs' own default base URLs: a client that spells one out means the provider itself.
DEFAULT_BASE_URLS = {"anthropic": "https://api.anthropic.com", "openai": "https://api.openai.com/v1"}


def _default_profiles() -> dict[str, Profile]:
    return {"anthropic": Profile(kind="anthropic"), "openai": Profile(kind="openai")}


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every setting of a pool, with its default. See the README's configuration table."""

    first_event_timeout: float = 300.0
    stale_timeout: float = 30.0
    deadline: float = 1800.0
    heartbeat_interval: float = 1.0
    heartbeat_misses: int = 5
    startup_timeout: float = 30.0
    max_attempts: int = 3
    retry_backoff: float = 0.02
    headers_timeout: float = 30.0  # request sent -> the provider's response headers (then first_event_timeout)
    http_retry_backoff: float = 0.5  # base of the backoff after a provider's 429/5xx or a lost connection
    retry_after_max: float = 60.0  # a longer Retry-After ends the call with the provider's 429 at once
    circuit_failures: int = 3  # provider failures in a row that open a deployment's circuit; 0 = no circuits
    circuit_cooldown: float = 5.0  # how long a circuit first stays open (±20%), before one probe request
    circuit_cooldown_max: float = 10.0  # each failed probe doubles the cooldown, up to this
    circuit_probe_timeout: float = 5.0  # a probe's headers_timeout: a silent upstream costs its caller this, not more
    queue_limit: int = 10_000
    client_queue_limit: int = 0  # requests in flight per client connection; 0 = queue_limit
    client_rate: float = 0.0  # requests per second per client connection; 0 = unlimited
    client_burst: int = 0  # requests a connection may send at once under client_rate; 0 = one second's worth
    client_buffer: int = 10_000  # messages held for a client that stopped reading before it is cut off
    max_message_bytes: int = MAX_MESSAGE_BYTES
    queue_bytes_limit: int = 256 * 1024 * 1024  # request bytes the broker holds (queued or running) at once
    client_queue_bytes_limit: int = 0  # ... of them for one client connection; 0 = a quarter of queue_bytes_limit
    # Bounds on what one request may ask for itself: a caller cannot make the pool spin on
    # sub-second kills, wait forever, or retry without end.
    request_min_timeout: float = 0.25  # a request's own time limits are raised to at least this
    request_max_timeout: float = 7200.0  # ... and lowered to at most this
    request_max_attempts: int = 10  # a request's own max_attempts is lowered to this
    max_requests_per_worker: int = 0
    max_memory_per_worker_mb: int = 0
    respawn_backoff_max: float = 10.0
    idle_timeout: float = 60.0
    drain_timeout: float = 30.0
    run_dir: str = ""
    frontend: str = ""
    curve_server_key: str = ""  # the broker's secret certificate (`isopool keygen`), for a tcp:// frontend
    curve_clients_dir: str = ""  # public certificates (*.key) of the clients allowed over tcp://
    insecure: bool = False  # allow a tcp:// frontend without CURVE (anyone reaching the port may use the keys)
    http: str = ""
    metrics: str = ""  # HOST:PORT of the Prometheus endpoint (`isopool serve --metrics`)
    gateway_token: str = ""  # "auto": a token generated at start and printed on stderr
    gateway_token_file: str = ""  # a file holding the gateway's token (instead of gateway_token)
    gateway_origins: str = ""  # browser origins (comma-separated) allowed to use the gateway; others get 403
    gateway_read_timeout: float = 60.0  # seconds a gateway caller gets to send its request's headers, then its body
    allow_overrides: bool = False
    log_level: str = "WARNING"
    # A worker sends a stream's events that follow one another within this many ms in one message (the
    # first event, and any after a pause, at once): fewer messages per hop. 0 = one message per read.
    coalesce_ms: float = 1.0
    profiles: dict[str, Profile] = msgspec.field(default_factory=_default_profiles)
    models: dict[str, ModelRule] = {}
    request_fallbacks: list[Target] = []  # which fallbacks a request may name itself (model: a glob)
    continue_max_bytes: int = 1024 * 1024  # events a continued stream keeps for its continuation; beyond: not continued
    request_log: str = ""  # a JSONL file: one line per finished request (no content unless asked, never a key)
    request_log_max_bytes: int = 64 * 1024 * 1024  # rotated at this size (0: never)
    request_log_backups: int = 5  # rotated files kept (request_log.1, .2, ...)
    request_log_content: bool = False  # the request's messages and its answer's text in each line (bounded)
    prices: str = ""  # a TOML price table (broker/prices.py): the cost of the tokens in stats; none shipped

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"setting log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.request_min_timeout > self.request_max_timeout:
            raise ConfigError("settings request_min_timeout and request_max_timeout: need min <= max")
        if self.queue_bytes_limit < self.max_message_bytes:
            raise ConfigError("setting queue_bytes_limit must be >= max_message_bytes (one request must fit)")
        if self.circuit_cooldown > self.circuit_cooldown_max:
            raise ConfigError("settings circuit_cooldown and circuit_cooldown_max: need cooldown <= cooldown_max")
        addresses = {}
        for name in ("http", "metrics"):
            try:
                addresses[name] = listen_address(getattr(self, name)) if getattr(self, name) else None
            except ValueError as exc:
                raise ConfigError(f"setting {name}: {exc}") from None
        if http := addresses["http"]:
            host = http[0]
            if not is_loopback(host) and not (self.gateway_token or self.gateway_token_file):
                raise ConfigError(f"setting http: exposing the gateway on {host} needs a gateway_token")
            if self.gateway_token and self.gateway_token_file:
                raise ConfigError("settings gateway_token and gateway_token_file: set one of them, not both")
        if self.request_log:
            check_request_log(self.request_log, self.request_log_max_bytes, self.request_log_backups)
        if self.prices:
            from .prices import load

            try:
                load(self.prices)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if bool(self.curve_server_key) != bool(self.curve_clients_dir):
            raise ConfigError("settings curve_server_key and curve_clients_dir are set together or not at all")
        if self.curve_server_key:
            from .wire.curve import check_server_keys

            check_server_keys(self.curve_server_key, self.curve_clients_dir)
        if self.frontend.startswith("tcp://") and not self.curve_server_key and not self.insecure:
            raise ConfigError(
                f"setting frontend: {self.frontend} needs CURVE authentication (curve_server_key and "
                "curve_clients_dir; make the keys with `isopool keygen`), or insecure = true (`--insecure`) "
                "if every host that can reach the port may spend the provider keys"
            )
        if not self.profiles:
            raise ConfigError("setting profiles: at least one provider profile is needed")
        for name, p in self.profiles.items():
            if p.min_workers > p.max_workers:
                raise ConfigError(f"profile {name}: need min_workers <= max_workers, got {p.min_workers} > "
                                  f"{p.max_workers}")  # fmt: skip
            _check_cloud(name, p)
            rules = [(f"profile {name}", p.continue_streams)]
            rules += [(f"profile {name} model {glob!r}", r.continue_streams) for glob, r in p.models.items()]
            rules += [(f"model {glob!r}", r.continue_streams) for glob, r in self.models.items()]
            for where, strategies in rules:
                if unknown := [s for s in strategies or () if s not in CONTINUE_STRATEGIES]:
                    raise ConfigError(f"{where}: continue_streams takes {' and '.join(CONTINUE_STRATEGIES)}, "
                                      f"not {', '.join(map(repr, unknown))}")  # fmt: skip
        check_routes(self)

    def default_profile(self, kind: str) -> str:
        """The profile a request of this kind goes to when it names none: the one of that name, else the
        first of that kind, else (for `anthropic` and `openai`) the first of that family (a cloud's)."""
        if kind in self.profiles:
            return kind
        of_kind = (n for n, p in self.profiles.items() if p.kind == kind)
        return next(of_kind, next((n for n, p in self.profiles.items() if p.family == kind), ""))

    def bound(self, sub: Submit) -> Submit:
        """A request's own limits within `request_min_timeout`..`request_max_timeout` and
        `request_max_attempts`; ValueError naming a limit that is not a positive number."""
        times = {}
        for name in ("first_event_timeout", "stale_timeout", "deadline", "read_timeout"):
            value = getattr(sub, name)
            if value is not None and not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
            if value is not None:
                times[name] = min(max(float(value), self.request_min_timeout), self.request_max_timeout)
        attempts = sub.max_attempts
        if attempts is not None and (isinstance(attempts, bool) or attempts < 1):
            raise ValueError(f"max_attempts must be >= 1, got {attempts!r}")
        if attempts is not None:
            times["max_attempts"] = min(attempts, self.request_max_attempts)
        return msgspec.structs.replace(sub, **times) if times else sub

    def limits(self, profile: str, model: str, request: Limits) -> tuple[float, float, float]:
        """(first_event_timeout, stale_timeout, deadline) for one request."""
        p = self.profiles[profile]
        scopes = [request, *matching(p.models, model), Limits(p.first_event_timeout, p.stale_timeout, p.deadline)]
        scopes += [*matching(self.models, model), Limits(self.first_event_timeout, self.stale_timeout, self.deadline)]
        return tuple(  # type: ignore[return-value]
            next(v for s in scopes if (v := getattr(s, f)) is not None)
            for f in ("first_event_timeout", "stale_timeout", "deadline")
        )


def check_numbers(settings: Settings) -> None:
    """Each number of the settings, of their model rules and of each profile's own (its deployments' and
    model rules' too) within its RANGES entry; None inherits, so it is not checked."""
    scopes: list[tuple[str, msgspec.Struct]] = [("setting ", settings)]
    scopes += [(f"model {glob!r}: ", rule) for glob, rule in settings.models.items()]
    for name, p in settings.profiles.items():
        scopes += [(f"profile {name}: ", p), *((f"profile {name}: deployment {d.name!r}: ", d) for d in p.deployments)]
        scopes += [(f"profile {name} model {glob!r}: ", rule) for glob, rule in p.models.items()]
    for where, scope in scopes:
        for field in scope.__struct_fields__:
            allowed, value = RANGES.get(field), getattr(scope, field)
            if allowed is not None and value is not None and not allowed.allows(value):
                number = "an integer" if isinstance(value, int) else "a finite number"
                raise ConfigError(f"{where}{field} must be {number} {allowed}, got {value}")


def _check_cloud(name: str, p: Profile) -> None:
    """A cloud setting on a kind it is not for, or a kind whose libraries are not installed: a ConfigError."""
    for setting, kinds in CLOUD_SETTINGS.items():
        if getattr(p, setting) and p.kind not in kinds:
            raise ConfigError(f"profile {name}: {setting} is a setting of {' and '.join(kinds)} profiles, "
                              f"not of kind {p.kind!r}")  # fmt: skip
    if lacking := missing(p.kind, p.auth):
        raise ConfigError(f"profile {name}: {lacking}")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


SCALAR_SETTINGS = [f for f in Settings.__struct_fields__ if f not in ("profiles", "models", "request_fallbacks")]


def load_settings(
    path: str | os.PathLike | None = None, env: dict[str, str] | None = None, **overrides: Any
) -> Settings:
    """File < environment (`ISOPOOL_<SETTING>`, and `ISOPOOL_CONFIG` for the file) < keyword arguments."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = path or env.get("ISOPOOL_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    from_env = {}
    for name in SCALAR_SETTINGS:
        if (value := env.get(f"ISOPOOL_{name.upper()}")) is not None:
            data[name] = from_env[name] = value
    data.update(overrides)
    if "profiles" in data:
        data["profiles"] = {
            k: msgspec.structs.asdict(v) if isinstance(v, Profile) else v for k, v in data["profiles"].items()
        }
    for name, profile in (data.get("profiles") or {}).items():
        if isinstance(profile, dict) and "sdk_max_retries" in profile:
            raise ConfigError(f"profile {name!r}: sdk_max_retries is gone: the pool retries every call (the "
                              "max_attempts setting) and a worker's SDK never does; remove it")  # fmt: skip
    try:
        return msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        where = str(exc).rpartition(" - at `$.")[2].rstrip("`")  # the setting msgspec names, if one of ours
        if where in from_env and where not in overrides:
            raise ConfigError(f"invalid setting: ISOPOOL_{where.upper()}={from_env[where]!r}: {exc}") from None
        raise ConfigError(f"invalid setting: {exc}") from None
