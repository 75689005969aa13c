"""Running a broker process: `isopool serve` in the foreground, or an embedded pool's owned child.

The owned child (`python -P -m broker.server`) reads its settings as one JSON
line on stdin, says where it serves (a `BrokerReady` JSON line) on stdout, and stops as soon as its
stdin closes, so a pool never outlives the process that started it.
"""

from __future__ import annotations

import logging
import os
import sys

import msgspec

from ..config import Settings
from ..processes import Child, ChildFailed
from ..protocol import BrokerReady, Listening
from .broker import Broker

log = logging.getLogger(__name__)


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
        if owned:
            urls = {name: child.url for name, child in children.items()}
            print(msgspec.json.encode(BrokerReady(broker.frontend_url, os.getpid(), **urls)).decode(), flush=True)
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
    where it listens; it stops when its stdin closes, so it never outlives the broker."""

    def __init__(self, module: str, frontend: str, listen: str, secret: str = "") -> None:
        self.child = Child(module, "--url", frontend, "--listen", listen, handover=secret.encode())
        try:
            self.url = self.child.handshake(Listening, f"{module} on {listen}").url
        except ChildFailed:
            self.child.stop()
            raise

    def stop(self) -> None:
        self.child.stop()


def main() -> None:
    settings = msgspec.json.decode(sys.stdin.buffer.readline(), type=Settings)
    run_broker(settings, owned=True)
