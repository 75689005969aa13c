"""What `isopool loadtest` takes: its options, each checked when they are made (a ValueError that
the command line shows as a usage error), and the workload and load points they describe."""

from __future__ import annotations

import math
import os
from typing import Any

import msgspec

from .cloudtarget import CLOUDS
from .prompts import MAX_TOKENS, SharedPrefix
from .scrape import validate as validate_server_metrics
from .search import Search
from .summary import parse_slo
from .trace import Trace
from .workload import APIS, DEFAULT_MODEL, Dataset, Lengths, Synthetic

Workload = Synthetic | Dataset | Trace

_TARGETS = ("fake", "anthropic", "openai")


class Options(msgspec.Struct, frozen=True, kw_only=True):
    """Everything `isopool loadtest` takes (see its --help)."""

    target: str = "fake"  # fake, anthropic, openai, or the base URL of an OpenAI-compatible server
    api: str = ""  # messages, chat or responses; by default the target's own
    model: str = ""
    concurrency: list[int] = []  # closed loop: this many requests always in flight, one point each
    rate: list[float] = []  # open loop: requests per second, one point each
    max_concurrency: int = 0  # cap of an open loop (0: none)
    arrival: str = "poisson"  # or constant
    requests: int = 0  # per point; 0 with no duration means 100
    duration: float = 0.0  # seconds per point
    warmup: float = 0.0  # seconds at the start of each point left out of the figures
    ramp_up: float = 0.0  # seconds over which the load rises to its level
    input_tokens: str = "256"
    output_tokens: str = "128"
    stream: bool = True
    stale_timeout: float = 10.0
    first_event_timeout: float = 60.0
    slo: str = ""
    seed: int = 0
    streams_per_worker: int = 0  # 0: one worker per core (fast path); 1 with `sdk` (a kill takes no neighbour)
    sdk: bool = False  # time events as the official SDK hands them over, parsed (what applications pay)
    fake_ttft: float = 0.05  # the built-in fake provider's latency model: a fast server
    fake_gap: float = 0.005
    fake_faults: dict[str, float] = {}  # fault spec -> share of requests, e.g. {"stall-ping:after=5": 0.1}
    calibrate: bool = True  # first measure the generator's own ceiling against the built-in fake
    turns: int = 1  # synthetic conversations of this many turns (each turn carries the ones before)
    dataset: str = ""  # a JSONL of requests in the batch formats, instead of synthetic prompts
    api_key_env: str = ""  # the variable whose key goes to the target (a URL gets no key without it)
    server_metrics: str = ""  # a Prometheus endpoint scraped during each point; "target": the target's /metrics
    server_metrics_interval: float = 1.0  # seconds between two scrapes
    server_metrics_series: str = ""  # names or glob patterns, comma-separated; "": every numeric series
    trace: str = ""  # replay this trace (Mooncake, or batch requests with timestamps) at its own times
    speedup: float = 1.0  # the trace's times divided by this
    prefix_tokens: int = 0  # synthetic prompts open with one of `prefix_groups` shared prefixes this long
    prefix_groups: int = 1
    fake_load_knee: int = 0  # the built-in fake slows beyond this many answers in progress ...
    fake_load_slope: float = 0.0  # ... its ttft and gap each growing by this share per answer (0: never slows)
    find_max: Search | None = None  # instead of the listed loads, search for the highest that meets the SLO
    ray: str = ""  # a Ray cluster's address ("auto": the one started here): a generator pool on every node
    cloud: str = ""  # bedrock, vertex or azure: through a profile of that kind (loadtest/cloudtarget.py)

    def __post_init__(self) -> None:
        self._check_finite()
        if self.target not in _TARGETS and not self.target.startswith(("http://", "https://")):
            raise ValueError(f"target must be fake, anthropic, openai or an http(s):// URL, not {self.target!r}")
        if self.api and self.api not in APIS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, not {self.api!r}")
        if self.target == "anthropic" and self.api not in ("", "messages"):
            raise ValueError("the anthropic target speaks the messages api")
        self._check_cloud()
        if self.target not in ("fake", "anthropic") and self.api == "messages" and not self.cloud:
            raise ValueError("the messages api needs --target anthropic or fake")
        if self.concurrency and self.rate:
            raise ValueError("give --concurrency (closed loop) or --rate (open loop), not both")
        if any(c < 1 for c in self.concurrency) or any(r <= 0 for r in self.rate):
            raise ValueError("concurrency must be >= 1 and rate > 0")
        if self.requests < 0 or self.duration < 0 or self.warmup < 0 or self.ramp_up < 0:
            raise ValueError("requests, duration, warmup and ramp-up cannot be negative")
        if self.turns < 1:
            raise ValueError("turns must be >= 1")
        if self.dataset and self.turns > 1:
            raise ValueError("--turns makes synthetic conversations; a dataset's requests are sent as they are")
        if self.arrival not in ("poisson", "constant"):
            raise ValueError(f"arrival must be poisson or constant, not {self.arrival!r}")
        Lengths.parse(self.input_tokens), Lengths.parse(self.output_tokens), parse_slo(self.slo)
        if self.api_key_env and self.target == "fake":
            raise ValueError("the fake provider takes no key: leave --api-key-env out")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ValueError(f"{self.api_key_env} is not set: put the target's key in it, or leave --api-key-env out")
        own = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}.get(self.target)
        if own and not self.api_key_env and not os.environ.get(own):  # all would fail, the generator blamed
            raise ValueError(f"--target {self.target} sends the key in {own}, which is not set: set it, or name "
                             "another variable with --api-key-env")  # fmt: skip
        validate_server_metrics(self.server_metrics, self.target, self.server_metrics_interval,
                                self.server_metrics_series)  # fmt: skip
        self._check_trace_and_prefix()
        apart = {"--trace": self.trace, "--find-max": self.find_max, "--server-metrics": self.server_metrics}
        if self.ray and (alone := [name for name, value in apart.items() if value]):
            raise ValueError(f"{', '.join(alone)} cannot be spread over Ray nodes yet: run it without --ray")

    def _check_finite(self) -> None:
        """No nan or inf anywhere: nan passes every comparison below (`--rate nan` crashed the schedule)."""
        for name in self.__struct_fields__:
            value = getattr(self, name)
            numbers = value.values() if isinstance(value, dict) else value if isinstance(value, list) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")

    def _check_cloud(self) -> None:
        if self.cloud and self.cloud not in CLOUDS:
            raise ValueError(f"--cloud must be one of {', '.join(CLOUDS)}, not {self.cloud!r}")
        if self.cloud and self.target in ("anthropic", "openai"):
            raise ValueError("--cloud runs against the fake or --target URL (the cloud's endpoint), not "
                             f"--target {self.target}")  # fmt: skip
        if self.cloud and self.api not in ("", CLOUDS[self.cloud]):
            raise ValueError(f"--cloud {self.cloud} speaks the {CLOUDS[self.cloud]} api")

    def _check_trace_and_prefix(self) -> None:
        if not self.speedup > 0 or (self.speedup != 1.0 and not self.trace):
            raise ValueError("--speedup must be a number above 0, and goes with --trace")
        given = {"--rate": self.rate, "--concurrency": self.concurrency, "--dataset": self.dataset,
                 "--turns": self.turns > 1, "--ramp-up": self.ramp_up,
                 "--prefix-tokens": self.prefix_tokens}  # fmt: skip
        if self.trace and (clash := [name for name, value in given.items() if value]):
            raise ValueError(f"--trace replays the trace's own requests at its own times: leave out {', '.join(clash)}")
        if not 0 <= self.prefix_tokens <= MAX_TOKENS or self.prefix_groups < 1:
            raise ValueError(f"--prefix-tokens must be 0 to {MAX_TOKENS:,} and --prefix-groups >= 1")
        if self.prefix_groups > 1 and not self.prefix_tokens:
            raise ValueError("--prefix-groups needs --prefix-tokens (how long each shared prefix is)")
        if self.prefix_tokens and self.dataset:
            raise ValueError("--prefix-tokens makes synthetic prompts; a dataset's requests are sent as they are")
        if self.fake_load_knee < 0 or self.fake_load_slope < 0:
            raise ValueError("--fake-load-knee and --fake-load-slope cannot be negative")
        if self.find_max and not self.slo:
            raise ValueError("--find-max needs --slo: the limits a request must meet, e.g. --slo ttft=500ms,tpot=50ms")
        if self.find_max and (self.rate or self.concurrency):
            raise ValueError("--find-max chooses the loads itself: leave out --rate and --concurrency "
                             "(bound the search with --start and --max)")  # fmt: skip
        if self.find_max and (self.find_max.over == "speedup") != bool(self.trace):
            raise ValueError("with --trace, --find-max searches the trace's speedup (the rate it is replayed at); "
                             "without one, a rate or a concurrency")  # fmt: skip
        if self.find_max and self.speedup != 1.0:
            raise ValueError("--find-max chooses the trace's speedup itself: leave out --speedup (start the search "
                             "with --start)")  # fmt: skip

    def workload(self) -> Workload:
        """What to send: the dataset's requests, the trace's, or synthetic conversations."""
        if self.dataset:
            return Dataset(self.dataset, self.stream, self.model, self.api)
        api = self.chosen_api
        if self.trace:
            return Trace(self.trace, self.stream, self.model, api, self.api)
        prefix = SharedPrefix(self.prefix_tokens, self.prefix_groups, self.seed) if self.prefix_tokens else None
        return Synthetic(api, self.model or DEFAULT_MODEL[api], Lengths.parse(self.input_tokens),
                         Lengths.parse(self.output_tokens), self.stream, self.seed, self.turns, prefix)  # fmt: skip

    @property
    def worker_streams(self) -> int:
        """Streams per worker. The fast path cuts a stall in the worker, so its neighbours go on, and
        one worker per core spends the least on switching between processes (at 256 streams on two
        cores, 2 workers served 1.5x the chunks/s of 8); on the SDK path the broker kills a stalled
        stream's worker, so each stream gets its own."""
        if self.streams_per_worker or self.sdk:
            return self.streams_per_worker or 1
        return math.ceil(self.capacity / (os.cpu_count() or 1))

    @property
    def chosen_api(self) -> str:
        if self.cloud:
            return CLOUDS[self.cloud]
        return self.api or ("messages" if self.target == "anthropic" else "chat")

    @property
    def points(self) -> list[dict[str, Any]]:
        """The loads listed (none under --find-max, whose search picks them as it goes)."""
        if self.find_max:
            return []
        if self.trace:
            return [self.load("speedup", self.speedup)]
        if self.rate:
            return [self.load("rate", r) for r in self.rate]
        return [self.load("concurrency", c) for c in self.concurrency or [8]]

    def load(self, kind: str, level: float) -> dict[str, Any]:
        """A load point: a rate (with its cap and arrival process) or a concurrency."""
        if kind == "rate":
            return {"rate": level, "max_concurrency": self.max_concurrency, "arrival": self.arrival}
        if kind == "speedup":
            return {"trace": os.path.basename(self.trace), "speedup": level, "max_concurrency": self.max_concurrency}
        return {"concurrency": int(level)}

    @property
    def requests_per_point(self) -> int:
        """0: until the duration (or the trace) is over."""
        return self.requests or (0 if self.duration or self.trace else 100)

    @property
    def capacity(self) -> int:
        """Streams the pool must carry at once."""
        if self.rate or self.trace or (self.find_max and self.find_max.over == "rate"):
            return self.max_concurrency or 256
        if self.find_max:
            return int(self.find_max.ceiling)
        return max(self.concurrency or [8])
