"""Starting and ending the processes isopool owns.

Every child is started with `python -P` so that a caller's own `broker.py` or
`worker.py` in the current directory can never shadow ours, and is ended by
`kill_tree`, which SIGKILLs the whole tree, children first, or, for workers, which
lead their own process group, by `kill_group`; both treat "no such process" as done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil


def python_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-P", "-m", module, *args]


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


def stop_popen(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """Terminate, wait up to `grace`, then kill the whole tree; always reaps."""
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
