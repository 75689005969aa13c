"""A server process the bench owns that `broker.processes.Child` cannot start (a script run by
path, another environment's interpreter): started with a pipe on its stdin, which it watches
and exits when it closes (also when the bench dies); stopped on exit of the `with`, Ctrl-C
included, by closing that pipe, then killing its whole tree."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable

import psutil

from broker.processes import kill_tree


class OwnedServer:
    """`with OwnedServer(command) as server:` until `ready(server)` returns its URL (None: not yet)."""

    def __init__(self, command: list[str], ready: Callable[[OwnedServer], str | None], what: str, timeout: float,
                 env: dict[str, str] | None = None, log: str | None = None) -> None:  # fmt: skip
        self.command, self.ready, self.what, self.timeout, self.env, self.log = command, ready, what, timeout, env, log
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def __enter__(self) -> OwnedServer:
        output = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=output, env=self.env)  # fmt: skip
        if self.log:
            output.close()  # type: ignore[union-attr]
        try:
            deadline = time.monotonic() + self.timeout
            while not (url := self.ready(self)):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.what} exited with {self.proc.returncode}" + _see(self.log))
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.what} not ready within {self.timeout:g} s" + _see(self.log))
                time.sleep(0.1)
            self.url = url
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            started = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            started = []
        try:
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(3)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
        for child in started:  # psutil knows each by its start time: a reused pid is not hit
            try:
                child.kill()
            except psutil.Error:
                pass
        proc.stdout.close()  # type: ignore[union-attr]


def first_line(server: OwnedServer) -> str | None:
    """Ready once the server printed its URL."""
    return server.proc.stdout.readline().decode().strip() or None  # type: ignore[union-attr]


def answers(base: str, path: str) -> Callable[[OwnedServer], str | None]:
    """Ready, at `base`, once `base + path` answers 200."""

    def probe(server: OwnedServer) -> str | None:
        try:
            with urllib.request.urlopen(base + path, timeout=2) as response:
                return base if response.status == 200 else None
        except OSError:
            return None

    return probe


def _see(log: str | None) -> str:
    return f"; see {log}" if log else ""
