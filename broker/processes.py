"""Starting and ending the processes isopool owns.

Every child is started with `python -P` so that a caller's own `broker.py` or
`worker.py` in the current directory can never shadow ours, and is ended by
`kill_tree`, which SIGKILLs the whole tree, children first, and treats
"no such process" as already done.
"""

from __future__ import annotations

import subprocess
import sys

import psutil


def python_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-P", "-m", module, *args]


def kill_tree(target: int | psutil.Process) -> None:
    """SIGKILL a process and all its descendants; idempotent. Given a `psutil.Process` taken
    while the process was known alive, a recycled pid is never hit (psutil checks its start time)."""
    try:
        parent = target if isinstance(target, psutil.Process) else psutil.Process(target)
        if not parent.is_running():
            return
        victims = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
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
