"""Running a broker process: `isopool serve` in the foreground, or an embedded pool's owned child.

The owned child (`python -P -m broker.server`) reads its settings as one JSON
line on stdin, says where it serves (a `BrokerReady` JSON line) on stdout, and stops as soon as its
stdin closes, so a pool never outlives the process that started it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import msgspec

from ..config import Settings
from ..processes import Child, ChildFailed, say_ready
from ..protocol import BrokerReady, Listening
from .broker import Broker

log = logging.getLogger(__name__)
RESTART_PAUSE, RESTART_PAUSE_MAX = 1.0, 30.0  # between failed starts of an HTTP child that died (doubling)


def run_broker(settings: Settings, owned: bool = False) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    broker = Broker(settings)
    children: dict[str, ChildServer] = {}
    try:
        broker.start()
        broker.install_signal_handlers()
        if owned:
            broker.stop_when_closed(sys.stdin.fileno())
        if settings.http:  # the gateway's hand-over is every setting (its token among them), as one JSON line
            handover = msgspec.json.encode(settings).decode()
            children["http"] = ChildServer("broker.http.gateway", broker.frontend_url, settings.http, handover)
        if settings.metrics:
            children["metrics"] = ChildServer("broker.http.metrics", broker.frontend_url, settings.metrics)
        for child in children.values():
            child.supervise()
        if owned:
            urls = {name: child.url for name, child in children.items()}
            say_ready(msgspec.json.encode(BrokerReady(broker.frontend_url, os.getpid(), **urls)).decode())
        else:
            lines = [
                f"isopool: broker pid {os.getpid()} serving on {broker.frontend_url}",
                f"  clients: export ISOPOOL_URL={broker.frontend_url}",
                "  Ctrl-C or SIGTERM drains (in-flight requests finish, then everything stops)",
            ]
            if "http" in children:
                url = children["http"].url
                lines.insert(2, f"  HTTP gateway: base_url {url} (Anthropic), {url}/v1 (OpenAI)")
            if "metrics" in children:
                lines.insert(2, f"  Prometheus metrics: {children['metrics'].url}")
            print("\n".join(lines), flush=True)
        broker.run()
    finally:
        for child in children.values():
            child.stop()
        broker.close()


class ChildServer:
    """An HTTP server child of the broker (the gateway `broker.http.gateway`, the metrics endpoint
    `broker.http.metrics`): a secret, if any, goes on its stdin (never the command line); it says
    where it listens; it stops when its stdin closes, so it never outlives the broker. Once
    supervised, one that dies (the OOM killer's choice, a crash) is started again at the address it
    had, from a thread of its own, so the broker's loop never waits on it."""

    def __init__(self, module: str, frontend: str, listen: str, secret: str = "") -> None:
        self.module, self.frontend, self.secret = module, frontend, secret
        self.child, self.url = self._start(listen)
        self.listen = self.url.removeprefix("http://").split("/", 1)[0]  # the port it bound, if it was 0
        self._lock = threading.Lock()  # held while starting one: `stop` then waits, and nothing starts after it
        self._stopped = threading.Event()

    def _start(self, listen: str) -> tuple[Child, str]:
        """A new child listening at `listen`, and its URL."""
        child = Child(self.module, "--url", self.frontend, "--listen", listen, handover=self.secret.encode())
        try:
            return child, child.handshake(Listening, f"{self.module} on {listen}").url
        except ChildFailed:
            child.stop()
            raise

    def supervise(self) -> None:
        threading.Thread(target=self._watch, name=f"isopool-{self.module}", daemon=True).start()

    def _watch(self) -> None:
        pause = RESTART_PAUSE
        while True:
            code = self.child.proc.wait()
            with self._lock:
                if self._stopped.is_set():
                    return
                log.error("%s (pid %d) exited with code %s; starting it again on %s", self.module, self.child.pid,
                          code, self.listen)  # fmt: skip
                self.child.stop()  # reaped, its pipes closed
                try:
                    self.child, url = self._start(self.listen)
                    log.warning("%s serving again at %s (pid %d)", self.module, url, self.child.pid)
                    pause = RESTART_PAUSE
                    continue
                except ChildFailed as exc:
                    log.error("%s did not start again (%s); trying again in %gs", self.module, exc, pause)
            if self._stopped.wait(pause):
                return
            pause = min(pause * 2, RESTART_PAUSE_MAX)

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            self.child.stop()


def main() -> None:
    settings = msgspec.json.decode(sys.stdin.buffer.readline(), type=Settings)
    run_broker(settings, owned=True)
