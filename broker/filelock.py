"""An exclusive flock on the file at a path that other processes may replace or remove meanwhile."""

from __future__ import annotations

import fcntl
import os
import time


def lock_file(path: str, flags: int, mode: int, patience: float = 0.0) -> int | None:
    """`path` opened with `flags` (created with `mode` if they say so) and locked, or None while another
    process holds it, after waiting up to `patience` seconds. A file replaced or removed between the open
    and the lock (a rename over it, a holder removing it as it lets go) is let go, and the one now at
    `path` taken: a lock on a file no name reaches would lock nothing."""
    deadline = time.monotonic() + patience
    while True:
        fd = os.open(path, flags, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
            continue
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
