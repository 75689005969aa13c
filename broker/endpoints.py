"""Where the broker's sockets live: `ipc://` files in a directory only the owner can enter."""

from __future__ import annotations

import os
import stat
import tempfile

from .filelock import lock_file


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


LOCK = "broker.lock"
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class RunDirTaken(RuntimeError):
    """Another broker serves in the run directory: the message names it and says what to do."""


class RunDirLock:
    """`run_dir/broker.lock`, locked (flock) for as long as a broker serves there. Binding an ipc
    socket replaces the file of one that exists, so a second broker in the same directory took over
    the first one's sockets: the first went on running, unreachable, and whichever stopped first
    removed the other's files. The kernel drops the lock when its holder dies, however it dies;
    then that broker's zygote takes it to remove what the broker left (`free`)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def take(cls, run_dir: str) -> RunDirLock:
        """The lock, with this process's pid in it; RunDirTaken if a broker holds it. Waits a moment: a
        killed broker's zygote holds it while it removes that broker's files."""
        path = os.path.join(run_dir, LOCK)
        for attempt in range(3):
            try:
                fd = lock_file(path, _LOCK_FLAGS, 0o600, patience=1.0)
                break
            except FileNotFoundError:  # a stopping broker or its zygote removed the directory: make it again
                if attempt == 2:
                    raise
                ensure_private_dir(run_dir)
        if fd is None:
            raise RunDirTaken(f"a broker (pid {_holder(path)}) is already serving in {run_dir}: stop it first "
                              f"(`isopool stats` shows it), or {_OWN_DIR}")  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    @classmethod
    def free(cls, run_dir: str) -> RunDirLock | None:
        """The lock if no broker holds it (for removing what a killed one left), else None. Waits a moment:
        the zygote hears of its broker's death when its pipe closes, maybe before the lock's file does."""
        path = os.path.join(run_dir, LOCK)
        try:
            fd = lock_file(path, _LOCK_FLAGS, 0o600, patience=0.5)
        except FileNotFoundError:  # the directory is gone
            return None
        return None if fd is None else cls(path, fd)

    def release(self) -> None:
        """Remove the file, then unlock it (in that order: a newcomer never locks a file about to go). Idempotent."""
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read(32).strip() or "?"
    except OSError:
        return "?"


def listen_address(value: str) -> tuple[str, int]:
    """HOST:PORT as the host to bind (an IPv6 one in brackets, `[::1]:8080`; none: 127.0.0.1) and the
    port (0: any free one); ValueError saying what is wanted."""
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    # an IPv6 host out of brackets is refused: which of its colons ends it cannot be told
    if not sep or (":" in host and not bracketed) or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (a port within 0-65535; an IPv6 host in brackets, [::1]:8080)")
    return host or "127.0.0.1", int(port)


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def cannot_listen(server: str, host: str, port: int, exc: OSError) -> SystemExit:
    """An HTTP child's exit when its address is taken or not its to bind: said on its stderr, which the
    terminal shows above the broker's own refusal."""
    return SystemExit(f"isopool {server}: cannot listen on {http_url(host, port)}: {bind_failure(exc)}")


def bind_failure(exc: OSError) -> str:
    """Why a bind failed, in the system's words (aiohttp's own strerror repeats the address)."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def ipc_url(run_dir: str, name: str) -> str:
    return f"ipc://{os.path.join(run_dir, name + '.sock')}"


def restrict(url: str) -> None:
    """Make a freshly bound ipc socket file owner-only (0600)."""
    if url.startswith("ipc://"):
        os.chmod(url[6:], 0o600)


def cleanup(run_dir: str, *urls: str, only: dict[str, int] | None = None, lock: RunDirLock | None = None) -> None:
    """Remove the ipc socket files of `urls` (with `only`: those still the files of `inodes`), then
    release `lock` (after the files: a newcomer's own sockets are never removed), then the directory
    if nothing else lives there."""
    for path in _ipc_paths(urls):
        try:
            if only is None or os.stat(path).st_ino == only.get(path):
                os.unlink(path)
        except FileNotFoundError:
            pass
    if lock is not None:
        lock.release()
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
