"""The zygote child as the broker sees it: spawn requests go in, reports come out (worker/pipe.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import time

from worker import pipe

from ..processes import Child

log = logging.getLogger(__name__)


class Zygote:
    """Owns the zygote process. Non-blocking: `fileno()` goes into the broker's poller."""

    def __init__(self, death_fd: int, sockets: tuple[str, ...] = (), sdks: tuple[str, ...] = ()) -> None:
        self._death_fd = death_fd
        self._sdks = sdks  # the SDK kinds to preload: those the profiles name (a worker imports its own if missing)
        self._sockets = sockets  # the broker's run dir and socket urls: the zygote removes them when its stdin closes
        self.child: Child | None = None
        self._pending = b""
        self.outbox = b""  # spawn requests its pipe could not take yet (it is busy or hung)
        self.loaded: set[str] = set()  # the profile kinds whose SDK it has imported: their workers fork at once
        self.ready = False  # it has imported every SDK
        self.started_at = 0.0

    def start(self) -> None:
        self.child = Child("worker.zygote", ",".join(self._sdks), *self._sockets, pass_fds=(self._death_fd,), grace=1.0)
        os.set_blocking(self.child.proc.stdout.fileno(), False)  # type: ignore[union-attr]
        os.set_blocking(self.child.proc.stdin.fileno(), False)  # type: ignore[union-attr]  # a hung zygote never blocks us
        self._pending = b""
        self.outbox = b""
        self.loaded = set()
        self.ready = False
        self.started_at = time.monotonic()

    def fileno(self) -> int:
        return self.child.proc.stdout.fileno()  # type: ignore[union-attr]

    @property
    def pid(self) -> int:
        return self.child.pid if self.child else 0

    def spawn(self, spec: pipe.WorkerSpec) -> bool:
        """Ask for a worker; False if the zygote is gone (the caller restarts it)."""
        self.outbox += pipe.encode(pipe.Spawn(spec)) + b"\n"
        return self.flush()

    def flush(self) -> bool:
        """Write what the pipe takes now, never blocking: a hung zygote's full pipe must not stop
        the broker (the startup timeout replaces that zygote). False if the zygote is gone."""
        try:
            written = os.write(self.child.proc.stdin.fileno(), self.outbox)  # type: ignore[union-attr]
        except BlockingIOError:
            return True
        except OSError:
            return False
        self.outbox = self.outbox[written:]
        return True

    def read(self) -> list[pipe.Report] | None:
        """Reports available now; None once the zygote has exited."""
        try:
            chunk = os.read(self.fileno(), 65536)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        return [pipe.decode_report(line) for line in lines if line]

    def imported(self, report: pipe.ZygoteReady) -> set[str]:
        """Note what the zygote now holds; returns the kinds that are new."""
        new = set(report.kinds) - self.loaded
        self.loaded |= new
        self.ready = self.loaded >= set(self._sdks)
        return new

    def forks(self, kind: str) -> bool:
        """Whether a worker of this kind is forked as soon as it is asked for (its SDK is in)."""
        return self.ready or kind in self.loaded

    def exit_status(self) -> int | None:
        """How a zygote whose pipe closed ended (negative: the signal that killed it)."""
        try:
            return self.child.proc.wait(1.0)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            return None

    def restart(self) -> None:
        """Replace a dead or unresponsive zygote. Only the zygote itself is killed: the workers it
        forked keep serving (their exits are no longer reported; heartbeats still watch them)."""
        if self.child is not None:
            self.child.proc.kill()
            self.child.stop()
        self.start()

    def stop(self) -> None:
        """Close its stdin (it exits by itself), then make sure: kill the tree and reap. One still
        importing an SDK is killed at once: it reads its stdin only when the import is done."""
        if self.child is not None:
            if not self.ready:
                self.child.proc.kill()
            self.child.stop()
            self.child = None
