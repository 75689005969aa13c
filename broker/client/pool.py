"""An embedded pool: a broker (with its zygote and workers) in a child process owned by this one.

    with Pool(stale_timeout=20) as pool:
        with pool.client() as client:
            print(client.request("anthropic", "messages.count_tokens", model=..., messages=...).json())

The child stops as soon as this process closes its stdin pipe: on `stop()`, at exit,
or when this process dies for any reason, so no pool outlives its owner.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import msgspec

from .. import endpoints
from ..config import BROKER_BOOT_TIMEOUT, ZYGOTE_BOOT_TIMEOUT, Settings, load_settings
from ..errors import BrokerUnavailable
from ..processes import Child, ChildFailed
from ..protocol import BrokerReady
from ..routes import group_key, groups
from .client import AsyncClient, Client


def _stop(child: Child, run_dir: str) -> None:
    """Stop the broker (closing its stdin stops it at once, killing its workers); remove the socket
    files a killed broker could not."""
    child.stop()
    if run_dir:  # its lock too, as a killed broker's zygote takes it
        urls = (endpoints.ipc_url(run_dir, "frontend"), endpoints.ipc_url(run_dir, "backend"))
        endpoints.cleanup(run_dir, *urls, lock=endpoints.RunDirLock.free(run_dir))


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
        self._child: Child | None = None
        self._finalizer: weakref.finalize | None = None

    def start(self, wait: bool = True) -> Pool:
        """Start the broker; with `wait`, return once every profile's `min_workers` are ready."""
        self._child = Child("broker.server", handover=msgspec.json.encode(self.settings))
        self._finalizer = weakref.finalize(self, _stop, self._child, self.settings.run_dir if self._own_dir else "")
        try:
            timeout = self.settings.startup_timeout
            setting = "startup_timeout" if timeout >= BROKER_BOOT_TIMEOUT else ""
            ready = self._child.handshake(BrokerReady, "the pool's broker", max(timeout, BROKER_BOOT_TIMEOUT), setting)
        except ChildFailed as exc:
            self.stop()
            raise BrokerUnavailable(str(exc)) from None
        self.url, self.pid, self.http_url, self.metrics_url = ready.url, ready.pid, ready.http, ready.metrics
        if wait:
            try:
                self.wait_ready(self.settings.startup_timeout + ZYGOTE_BOOT_TIMEOUT)
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Block until each profile has its `min_workers` ready; the error names the setting to change."""
        deadline = time.monotonic() + timeout
        wanted = {group: spec.min_workers for group, (_, _, spec) in groups(self.settings).items()}
        with self.client() as client:
            while True:
                ready: dict[str, int] = {}
                for w in client.snapshot().workers:
                    if w.state != "starting":
                        group = group_key(w.profile, w.deployment)
                        ready[group] = ready.get(group, 0) + 1
                missing = {n: m for n, m in wanted.items() if ready.get(n, 0) < m}
                if not missing:
                    return
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(
                        f"workers of profiles (or deployments) {sorted(missing)} not ready within {timeout:g}s; "
                        "see the broker's log"
                    )
                time.sleep(0.01)

    def client(self, broker_timeout: float = 10.0) -> Client:
        return Client(self.url, broker_timeout, self.settings.max_message_bytes)

    def async_client(self, broker_timeout: float = 10.0) -> AsyncClient:
        return AsyncClient(self.url, broker_timeout, self.settings.max_message_bytes)

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.proc.poll() is None

    def stop(self) -> None:
        """Stop the broker, which kills its workers and zygote; idempotent."""
        if self._finalizer is not None:
            self._finalizer()
        self._child = None

    def __enter__(self) -> Pool:
        return self.start() if self._child is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
