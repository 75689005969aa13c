"""The zygote: a process that has imported the SDKs, zmq and msgspec, holds no sockets,
threads or clients, and forks a new worker whenever the broker asks.

It speaks to the broker over its stdin/stdout pipes, one JSON object a line (worker/pipe.py):
a Spawn in, a ZygoteReady as each SDK is imported, then Spawned and Exited reports out.
It exits when its stdin closes (the broker is gone). Forked workers watch the
broker's liveness pipe (fd `death_fd`) and exit by themselves when it closes.
Its arguments are the SDK kinds to preload (comma-separated: those the broker's profiles
name, and no other), then the broker's run dir and socket urls: its stdin closes only when
the broker is done with them (closing, or killed), and a killed broker cannot remove its
socket files, so the zygote does (those it saw at its start, never a newer broker's), and its run dir lock (only
while no broker holds it). Like every owned child it ignores the terminal's Ctrl-C (broker/processes.py), and so
do the workers it forks: the broker's owner handles it.
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
import sys

from broker import endpoints

from . import pipe, sdks
from .main import preload, run_worker
from .pipe import Exited, Spawned, WorkerSpec, ZygoteReady


def _say(report: pipe.Report) -> None:
    os.write(1, pipe.encode(report) + b"\n")


def _fork(spec: WorkerSpec, wake_fds: tuple[int, int], selector: selectors.BaseSelector) -> int:
    pid = os.fork()
    if pid:
        os.setpgid(pid, pid)  # also done by the child: whichever runs first, it leads a group when reported
        return pid
    # the child: lead its own process group (one killpg ends it and whatever it starts; a
    # terminal's Ctrl-C goes to the broker, which drains), forget the zygote's pipes and
    # signal plumbing, then become a worker
    try:
        os.setpgid(0, 0)
        selector.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in wake_fds:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        run_worker(spec)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(70)
    os._exit(0)


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _say(Exited(pid, os.waitstatus_to_exitcode(status)))


class _Spawns:
    """Spawn requests from the broker's pipe, and those held until their SDK is imported."""

    def __init__(self) -> None:
        self.stdin = os.fdopen(0, "rb", buffering=0)
        self.pending = b""
        self.held: list[WorkerSpec] = []

    def read(self) -> bool:
        """Hold what the pipe has now; False once it is closed (the broker is closing or gone)."""
        chunk = self.stdin.read(65536)
        if not chunk:
            return False
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        self.held += [pipe.decode_spawn(line).spec for line in lines]
        return True

    def take(self, loaded: set[str] | None) -> list[WorkerSpec]:
        """The held requests whose SDK is imported (all of them once `loaded` is None: preloading is over)."""
        ready = [s for s in self.held if loaded is None or s.profile.kind in loaded]
        self.held = [s for s in self.held if s not in ready]
        return ready


def main() -> None:
    kinds, *places = sys.argv[1:]
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(rfd, selectors.EVENT_READ)
    run_dir, *urls = places or [""]
    sockets = endpoints.inodes(*urls)  # the broker bound them before starting us
    spawns = _Spawns()

    def serve(timeout: float | None, loaded: set[str] | None) -> bool:
        """Fork what is due, then wait: reap, read and fork what is due; False once the broker is gone (its
        sockets then removed). Due first: a request held while the SDKs were importing, for a kind none
        of them is (a dormant cloud profile: its worker imports its own), is due once preloading is over."""
        fork_due(loaded)
        for key, _ in selector.select(timeout):
            if key.fd == rfd:
                os.read(rfd, 4096)
                _reap()
            elif not spawns.read():
                if run_dir:
                    endpoints.cleanup(run_dir, *urls, only=sockets, lock=endpoints.RunDirLock.free(run_dir))
                return False
        fork_due(loaded)
        return True

    def fork_due(loaded: set[str] | None) -> None:
        for spec in spawns.take(loaded):
            _say(Spawned(spec.ident, _fork(spec, (rfd, wfd), selector)))

    # One SDK at a time, forking each one's workers as soon as it is in: the first profile's
    # workers need not wait for the second SDK's import (a second or more).
    loaded: set[str] = set()
    for kind in [k for k in kinds.split(",") if k] or [""]:
        if kind:
            # no collections while an SDK imports: each one walks the thousands of objects the import made so far
            # for almost no garbage (about an eighth of the import's CPU); one collection after it
            gc.disable()
            preload((kind,))
            loaded.add(kind)
        gc.collect()
        gc.freeze()  # keep preloaded objects out of the children's collections: less copy-on-write
        gc.enable()
        _say(ZygoteReady(os.getpid(), [m.__name__ for m in sdks.loaded()], sorted(loaded)))
        if not serve(0, loaded):
            return
    while serve(None, None):
        pass


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
