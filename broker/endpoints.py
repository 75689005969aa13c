"""Where the broker's sockets live: `ipc://` files in a directory only the owner can enter."""

from __future__ import annotations

import os
import stat
import tempfile


class UnsafeRunDir(PermissionError):
    """The run directory is not one only we can enter: the message says what to do."""


def private_run_dir() -> str:
    """A fresh 0700 directory for one embedded pool's sockets."""
    return tempfile.mkdtemp(prefix="isopool-")


def shared_run_dir() -> str:
    """The well-known directory of `isopool serve`, where `isopool stats` looks by default."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"isopool-{os.getuid()}")


_OWN_DIR = "set run_dir (ISOPOOL_RUN_DIR) to a directory of your own"


def ensure_private_dir(path: str, purpose: str = "put sockets there", instead: str = _OWN_DIR) -> str:
    """Create `path` 0700, or refuse a symlink, another user's directory, or one that others can write
    (the refusal says what we would not do there, `purpose`, and what to do `instead`).

    The checks and the chmod go through one descriptor opened with `O_NOFOLLOW`, so they apply to
    the directory itself: a link planted in a shared /tmp can neither redirect our sockets nor get
    what it points to chmodded, even if it is swapped between the checks."""
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:  # ELOOP: the last part is a symlink; ENOTDIR: a file
        kind = "a symlink" if os.path.islink(path) else "not a directory"
        raise UnsafeRunDir(f"{path} is {kind}; refusing to {purpose}: remove it, or {instead}") from exc
    try:
        _check_private(path, os.fstat(fd), purpose, instead)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def _check_private(path: str, info: os.stat_result, purpose: str, instead: str) -> None:
    if info.st_uid != os.getuid():
        raise UnsafeRunDir(f"{path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); refusing to "
                           f"{purpose}: {instead}")  # fmt: skip
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeRunDir(f"{path} is writable by others, who may have put files in it; refusing to {purpose}: "
                           f"remove it, or {instead}")  # fmt: skip


def ipc_url(run_dir: str, name: str) -> str:
    return f"ipc://{os.path.join(run_dir, name + '.sock')}"


def restrict(url: str) -> None:
    """Make a freshly bound ipc socket file owner-only (0600)."""
    if url.startswith("ipc://"):
        os.chmod(url[6:], 0o600)


def cleanup(run_dir: str, *urls: str, only: dict[str, int] | None = None) -> None:
    """Remove the ipc socket files of `urls` (with `only`: those still the files of `inodes`),
    then the directory if nothing else lives there."""
    for path in _ipc_paths(urls):
        try:
            if only is None or os.stat(path).st_ino == only.get(path):
                os.unlink(path)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(run_dir)  # only if nothing else lives there
    except OSError:
        pass


def inodes(*urls: str) -> dict[str, int]:
    """The ipc socket files of `urls` as they are now: `cleanup(only=...)` removes them and no newer ones."""
    found = {}
    for path in _ipc_paths(urls):
        try:
            found[path] = os.stat(path).st_ino
        except FileNotFoundError:
            pass
    return found


def _ipc_paths(urls: tuple[str, ...]) -> list[str]:
    """The socket file of each `ipc://` url (tcp:// ones have none)."""
    return [url[6:] for url in urls if url.startswith("ipc://")]
