"""Where the broker's sockets live: `ipc://` files in a directory only the owner can enter."""

from __future__ import annotations

import os
import stat
import tempfile


def private_run_dir() -> str:
    """A fresh 0700 directory for one embedded pool's sockets."""
    return tempfile.mkdtemp(prefix="isopool-")


def shared_run_dir() -> str:
    """The well-known directory of `isopool serve`, where `isopool stats` looks by default."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"isopool-{os.getuid()}")


def ensure_private_dir(path: str) -> str:
    """Create `path` 0700, or refuse one that others can write or that we do not own."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{path} is writable by others or not ours; refusing to put sockets there")
    os.chmod(path, 0o700)
    return path


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
