"""Running a broker process: `isopool serve` in the foreground, or an embedded pool's owned child.

The owned child (`python -P -m broker.serve --owned`) reads its settings as one JSON
line on stdin, says `{"ready": frontend_url}` on stdout, and stops as soon as its
stdin closes, so a pool never outlives the process that started it.
"""

from __future__ import annotations

import logging
import os
import sys

import msgspec

from .config import Settings
from .server import Broker

log = logging.getLogger(__name__)


def run_broker(settings: Settings, owned: bool = False) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    broker = Broker(settings)
    try:
        broker.start()
        broker.install_signal_handlers()
        if owned:
            broker.stop_when_closed(sys.stdin.fileno())
        if owned:
            print(msgspec.json.encode({"ready": broker.frontend_url, "pid": os.getpid()}).decode(), flush=True)
        else:
            print(
                f"isopool: broker pid {os.getpid()} serving on {broker.frontend_url}\n"
                f"  clients: export ISOPOOL_URL={broker.frontend_url}\n"
                "  Ctrl-C or SIGTERM drains (in-flight requests finish, then everything stops)",
                flush=True,
            )
    except BaseException:
        broker.close()
        raise
    broker.run()


def main() -> None:
    settings = msgspec.json.decode(sys.stdin.buffer.readline(), type=Settings)
    run_broker(settings, owned=True)


if __name__ == "__main__":
    main()
