"""The output file as the ledger of what is done: exactly one result line per custom_id.

On start it reads the results already there (a re-run after a crash), cuts off a torn
last line, and says which ids are done. Results are appended one line per write and
flushed at once, so a killed runner loses nothing it has written; `fsync` is batched
(every `sync_every` lines or `sync_interval` seconds, and at close) against power loss.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder()


class Ledger:
    def __init__(self, path: str, sync_every: int = 64, sync_interval: float = 0.2) -> None:
        self.path = path
        self.done: set[str] = set()
        self.repaired = 0  # bytes of a torn last line cut off
        self._recover()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._unsynced = 0
        self._synced_at = time.monotonic()
        self._sync_every, self._sync_interval = sync_every, sync_interval

    def _recover(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        good = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                record = _DEC.decode(line)
            except msgspec.DecodeError:
                break
            if isinstance(record, dict) and isinstance(record.get("custom_id"), str):
                self.done.add(record["custom_id"])
            good += len(line)
        if good < len(data):
            self.repaired = len(data) - good
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())

    def write(self, record: dict[str, Any]) -> None:
        """Append one result (exactly once per custom_id: a second one is a bug, and refused)."""
        custom_id = record["custom_id"]
        if custom_id in self.done:
            raise ValueError(f"custom_id {custom_id!r} already has a result")
        os.write(self._fd, _ENC.encode(record) + b"\n")  # one write: a line is whole or torn, never mixed
        self.done.add(custom_id)
        self._unsynced += 1
        now = time.monotonic()
        if self._unsynced >= self._sync_every or now - self._synced_at >= self._sync_interval:
            self.sync(now)

    def sync(self, now: float | None = None) -> None:
        if self._unsynced:
            os.fsync(self._fd)
            self._unsynced = 0
        self._synced_at = now or time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
