"""An embedded pool: a broker (with its zygote and workers) in a child process owned by this one.

    with Pool(stale_timeout=20) as pool:
        with pool.client() as client:
            print(client.request("anthropic", "messages.count_tokens", model=..., messages=...).json())

The child stops as soon as this process closes its stdin pipe: on `stop()`, at exit,
or when this process dies for any reason, so no pool outlives its owner.
"""

from __future__ import annotations

import selectors
import subprocess
import time
import weakref
from typing import Any

import msgspec

from .. import endpoints
from ..config import ZYGOTE_BOOT_TIMEOUT, Settings, load_settings
from ..errors import BrokerUnavailable
from ..processes import python_command, stop_popen
from ..protocol import BrokerReady
from .client import AsyncClient, Client


def _stop(proc: subprocess.Popen, run_dir: str) -> None:
    """Close the broker's stdin (it stops at once, killing its workers), wait, then make sure;
    remove the socket files a killed broker could not."""
    try:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(5.0)
    except (OSError, subprocess.TimeoutExpired):
        pass
    stop_popen(proc, grace=1.0)
    if run_dir:
        endpoints.cleanup(run_dir, endpoints.ipc_url(run_dir, "frontend"), endpoints.ipc_url(run_dir, "backend"))


class Pool:
    """Start with `start()` or `with Pool(...) as pool`; `settings` or keyword settings (see `Settings`)."""

    def __init__(self, settings: Settings | None = None, config: str | None = None, **overrides: Any) -> None:
        settings = settings or load_settings(config, **overrides)
        self._own_dir = not settings.run_dir
        self.settings = (
            settings if settings.run_dir else msgspec.structs.replace(settings, run_dir=endpoints.private_run_dir())
        )
        self.url = ""
        self.http_url = ""  # the HTTP gateway's base URL, with the `http` setting
        self.metrics_url = ""  # the Prometheus endpoint, with the `metrics` setting
        self.pid = 0
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    def start(self, wait: bool = True) -> Pool:
        """Start the broker; with `wait`, return once every profile's `min_workers` are ready."""
        self._proc = subprocess.Popen(python_command("broker.server"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._finalizer = weakref.finalize(self, _stop, self._proc, self.settings.run_dir if self._own_dir else "")
        self._proc.stdin.write(msgspec.json.encode(self.settings) + b"\n")  # type: ignore[union-attr]
        self._proc.stdin.flush()  # type: ignore[union-attr]
        line = self._readline(self.settings.startup_timeout)
        try:
            ready = msgspec.json.decode(line, type=BrokerReady)
        except msgspec.DecodeError:
            self.stop()
            raise BrokerUnavailable(
                f"the pool's broker failed to start (said {line[:200]!r}); see its log above"
            ) from None
        self.url, self.pid, self.http_url, self.metrics_url = ready.url, ready.pid, ready.http, ready.metrics
        if wait:
            try:
                self.wait_ready(self.settings.startup_timeout + ZYGOTE_BOOT_TIMEOUT)
            except BaseException:
                self.stop()
                raise
        return self

    def _readline(self, timeout: float) -> bytes:
        out = self._proc.stdout  # type: ignore[union-attr]
        with selectors.DefaultSelector() as sel:
            sel.register(out, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.stop()
                raise BrokerUnavailable(f"the pool's broker did not start within {timeout:g}s (startup_timeout)")
        return out.readline()

    def wait_ready(self, timeout: float) -> None:
        """Block until each profile has its `min_workers` ready; the error names the setting to change."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                ready: dict[str, int] = {}
                for w in client.snapshot().workers:
                    if w.state != "starting":
                        ready[w.profile] = ready.get(w.profile, 0) + 1
                missing = {
                    n: p.min_workers for n, p in self.settings.profiles.items() if ready.get(n, 0) < p.min_workers
                }
                if not missing:
                    return
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(
                        f"workers of profiles {sorted(missing)} not ready within {timeout:g}s; see the broker's log"
                    )
                time.sleep(0.01)

    def client(self, broker_timeout: float = 10.0) -> Client:
        return Client(self.url, broker_timeout, self.settings.max_message_bytes)

    def async_client(self, broker_timeout: float = 10.0) -> AsyncClient:
        return AsyncClient(self.url, broker_timeout, self.settings.max_message_bytes)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Stop the broker, which kills its workers and zygote; idempotent."""
        if self._finalizer is not None:
            self._finalizer()
        self._proc = None

    def __enter__(self) -> Pool:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
