"""What the broker and its zygote say over the zygote's pipes, one JSON object a line:

    broker -> zygote   Spawn(WorkerSpec)
    zygote -> broker   ZygoteReady as each SDK is imported, Spawned and Exited as they happen

Light on purpose (msgspec and the config only): the broker imports it, and must not load
what a worker runs.
"""

from __future__ import annotations

import msgspec

from broker.config import Profile


class WorkerSpec(msgspec.Struct, frozen=True):
    """Everything a new worker needs, handed over by the zygote (no secrets: keys come from the environment)."""

    ident: str
    backend: str
    profile: Profile
    heartbeat_interval: float
    death_fd: int
    token: str = ""  # proves to the broker that READY and HEARTBEAT come from the process it forked
    allow_overrides: bool = False  # may a request name its own base_url and key (the pool's owner only)
    log_level: str = "WARNING"
    coalesce: float = 0.0  # seconds a stream's events may be held to go out together (Settings.coalesce_ms)
    warm: bool = False  # run a first call once READY (worker/warmup.py): it replaces a worker killed with requests


class Spawn(msgspec.Struct, frozen=True):
    """Fork a worker."""

    spec: WorkerSpec


class ZygoteReady(msgspec.Struct, frozen=True, tag="ready"):
    """The SDK of these profile kinds is imported: their workers fork fast from now on."""

    pid: int
    sdks: list[str]  # the SDK packages it holds (read from its sys.modules)
    kinds: list[str]  # the profile kinds preloaded so far


class Spawned(msgspec.Struct, frozen=True, tag="spawned"):
    ident: str
    pid: int


class Exited(msgspec.Struct, frozen=True, tag="exited"):
    pid: int
    status: int  # negative: the signal that ended it


Report = ZygoteReady | Spawned | Exited

encode = msgspec.json.Encoder().encode
decode_spawn = msgspec.json.Decoder(Spawn).decode
decode_report = msgspec.json.Decoder(Report).decode
