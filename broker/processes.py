"""Starting and ending the processes isopool owns.

Every child is started with `python -P` so that a caller's own `broker.py` or
`worker.py` in the current directory can never shadow ours, and is ended by
`kill_tree`, which SIGKILLs the whole tree, children first, or, for workers, which
lead their own process group, by `kill_group`; both treat "no such process" as done.
A child started by `Child` (the embedded pool's broker, the broker's zygote and HTTP
children, the fake provider) stops as soon as its stdin closes, so it never outlives
its owner, whatever ends the owner.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import weakref
from collections.abc import Sequence
from typing import TypeVar

import msgspec
import psutil

T = TypeVar("T")


# `python -m module args` for an owned child, ignoring SIGINT from before its package is imported: the Ctrl-C a
# terminal sends its whole foreground process group is the owner's to handle (it stops its children), so a
# REPL that interrupts one call keeps its pool. (A process group of its own instead would put the child in
# the background, which the terminal stops the first time it writes there under `stty tostop`.)
_IGNORING_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)


def python_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-P", "-c", _IGNORING_CTRL_C, module, *args]


def say_ready(line: str) -> None:
    """An owned child's one line to its owner (`Child.handshake`). An owner gone meanwhile (stopped, or
    interrupted while this child started) is no error here: the child's closed stdin stops it next."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes there, not into an error at exit
        os.close(devnull)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop this process gracefully: SIGTERM, and SIGINT unless it was started ignoring it
    (an owned child; a shell's background job)."""
    return (signal.SIGTERM,) if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else (signal.SIGTERM, signal.SIGINT)


def running(pids: set[int]) -> set[int]:
    """Those of `pids` still running. A zombie has ended: an orphan whose new parent (a
    container's init, say) does not reap it stays one, yet runs nothing."""
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants; idempotent."""
    try:
        parent = psutil.Process(pid)
        victims = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def kill_group(proc: psutil.Process) -> None:
    """SIGKILL a process that leads its own process group, and everything it started, in one
    system call (no scan of the process table on the watchdog's path). `proc` was taken while
    the process was known alive, so a recycled pid is never hit (psutil checks its start
    time). Idempotent."""
    try:
        if proc.is_running():
            os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, psutil.Error):
        pass


class ChildFailed(RuntimeError):
    """An owned child ended, or said something else, or nothing in time, instead of its ready line."""


class Child:
    """A child process this one owns, from start to reap: `python -P -m module args`, handed one
    line on its stdin (settings or a secret: never on the command line, where `ps` shows it),
    answering with one ready line on its stdout (`handshake`), and stopping when its stdin
    closes, which also happens when this process dies. `stop` closes that pipe, waits up to
    `grace`, then SIGKILLs the tree; `weakref.finalize` does the same if the owner never does.
    It ignores the terminal's Ctrl-C, which is its owner's to handle (`python_command`)."""

    def __init__(
        self, module: str, *args: str, handover: bytes | None = None, pass_fds: Sequence[int] = (), grace: float = 5.0
    ) -> None:
        self.proc = subprocess.Popen(
            python_command(module, *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=tuple(pass_fds)
        )
        self._finalizer = weakref.finalize(self, _stop, self.proc, grace)
        if handover is not None:
            try:
                self.proc.stdin.write(handover + b"\n")  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
            except BrokenPipeError:
                pass  # it died at once: the handshake says so

    @property
    def pid(self) -> int:
        return self.proc.pid

    def handshake(self, kind: type[T], what: str, timeout: float | None = None, setting: str = "") -> T:
        """Its first line on stdout, decoded as `kind`; ChildFailed if it ends, says something else, or
        says nothing within `timeout` (`setting` names what to raise)."""
        out = self.proc.stdout
        with selectors.DefaultSelector() as sel:
            sel.register(out, selectors.EVENT_READ)  # type: ignore[arg-type]
            if not sel.select(timeout):
                raise ChildFailed(f"{what} did not start within {timeout:g}s" + (f" ({setting})" if setting else ""))
        line = out.readline()  # type: ignore[union-attr]
        try:
            return msgspec.json.decode(line, type=kind)
        except msgspec.DecodeError:
            raise ChildFailed(f"{what} failed to start (said {line[:200]!r}); see its log above") from None

    def stop(self) -> None:
        """Close its stdin (it exits by itself), wait up to `grace`, then kill the tree; reaps. Idempotent."""
        self._finalizer()


def _stop(proc: subprocess.Popen, grace: float) -> None:
    try:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(grace)
    except (OSError, subprocess.TimeoutExpired):
        pass
    if proc.poll() is None:
        kill_tree(proc.pid)
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
