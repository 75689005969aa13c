"""A hung worker's Python stacks, for the broker's log before the worker is killed.

A worker whose heartbeats stopped is hung in its interpreter (C code holding the GIL, a
deadlock): killed at once, it would leave nothing to find the cause by. So each worker
registers `faulthandler` on SIGUSR1 (a signal it has no other use for), writing every
thread's stack into an anonymous in-memory file of its own (memfd); the broker sends the
signal, waits a moment, reads the file through /proc/PID/fd, logs it, then kills.
faulthandler writes from its C signal handler, so it answers while a thread holds the
GIL; a stopped process answers nothing, and is killed all the same. Nothing is left on
disk. Linux only (memfd, /proc): elsewhere the broker kills without the stacks.
"""

from __future__ import annotations

import faulthandler
import os
import signal

SIGNAL = signal.SIGUSR1
GRACE = 0.5  # seconds between asking and reading: faulthandler answers in microseconds, once scheduled
_NAME = "isopool-stacks"
_LIMIT = 256 * 1024


def register() -> None:
    """In a new worker: answer SIGNAL with every thread's stack, written to our memfd."""
    try:
        fd = os.memfd_create(_NAME, os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux: no stacks, the kill is the same
        return
    faulthandler.register(SIGNAL, file=fd, all_threads=True)


def read(pid: int) -> str:
    """In the broker: what worker `pid` wrote when asked; "" if nothing (it could not answer)."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{fd}"
            if os.readlink(path).startswith(f"/memfd:{_NAME}"):
                with open(path, "rb") as dump:
                    return dump.read(_LIMIT).decode(errors="replace").strip()
    except OSError:
        pass
    return ""
