"""LiteLLM's proxy, side by side with the gateway: `litellm[proxy]` from the package index in a
virtual environment of its own (it pins other versions of what isopool uses), made on first
use under `$ISOPOOL_BENCH_CACHE` (default ~/.cache/isopool-bench), or named by
`$ISOPOOL_BENCH_LITELLM` (a Python that has `litellm[proxy]`). Run with one worker, no
database, a master key made per run, and each upstream of the run as a model.

Made by hand:  python3 -m venv ~/.cache/isopool-bench/litellm &&
               ~/.cache/isopool-bench/litellm/bin/pip install 'litellm[proxy]'
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import psutil

from .owned import OwnedServer, answers

VENV = os.path.join(os.environ.get("ISOPOOL_BENCH_CACHE") or os.path.expanduser("~/.cache/isopool-bench"), "litellm")
INSTALL_TIMEOUT = 600.0
START_TIMEOUT = 90.0
# The proxy's CLI, exiting when the bench's pipe on its stdin closes (with one worker uvicorn serves
# in this same process).
_RUN = """
import os, sys, threading
threading.Thread(target=lambda: (sys.stdin.buffer.read(), os._exit(0)), daemon=True).start()
from litellm.proxy.proxy_cli import run_server
sys.argv[0] = "litellm"
run_server()
"""


class Unavailable(Exception):
    """LiteLLM's proxy cannot run here; the message says why (the column is skipped with it)."""


def python() -> str:
    """The interpreter that has `litellm[proxy]`, installing it into its own venv on first use."""
    named = os.environ.get("ISOPOOL_BENCH_LITELLM")
    exe = named or os.path.join(VENV, "bin", "python")
    if _has_litellm(exe):
        return exe
    if named:
        raise Unavailable(f"$ISOPOOL_BENCH_LITELLM={named} cannot import litellm.proxy")
    base = getattr(sys, "_base_executable", sys.executable)
    try:
        subprocess.run([base, "-m", "venv", VENV], check=True, capture_output=True, timeout=120)
        subprocess.run([exe, "-m", "pip", "install", "-q", "litellm[proxy]"], check=True, capture_output=True,
                       timeout=INSTALL_TIMEOUT)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        tail = getattr(exc, "stderr", b"") or b""
        why = tail[-300:].decode(errors="replace")
        raise Unavailable(f"installing litellm[proxy] into {VENV} failed: {exc} {why}") from None
    if not _has_litellm(exe):
        raise Unavailable(f"litellm[proxy] installed into {VENV} but litellm.proxy does not import")
    return exe


def _has_litellm(exe: str) -> bool:
    try:
        check = subprocess.run([exe, "-c", "import litellm.proxy.proxy_cli, litellm"], capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return check.returncode == 0


def version(exe: str) -> str:
    out = subprocess.run([exe, "-c", "from importlib.metadata import version; print(version('litellm'))"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    return out.stdout.strip()


def config(models: dict[str, tuple[str, str]]) -> dict:
    """The proxy's config: `models` maps a model name to (provider, base URL)."""
    params = {name: {"model": f"{provider}/{name}", "api_base": base, "api_key": "bench-key"}
              for name, (provider, base) in models.items()}  # fmt: skip
    return {"model_list": [{"model_name": name, "litellm_params": p} for name, p in params.items()]}


def pids(pid: int) -> list[int]:
    """The proxy's process and those it started (none with one worker, as uvicorn runs it)."""
    return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def proxy(models: dict[str, tuple[str, str]], log_dir: str) -> Iterator[tuple[OwnedServer, str]]:
    """The running proxy and its master key (the callers' API key); Unavailable if it cannot start."""
    exe = python()
    key = "sk-" + secrets.token_hex(24)
    env = {**os.environ, "LITELLM_MASTER_KEY": key, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR"}  # fmt: skip
    env.pop("PYTHONPATH", None)  # its own environment only
    with tempfile.NamedTemporaryFile("wb", suffix=".json", dir=log_dir, delete=False) as f:
        f.write(msgspec.json.encode(config(models)))  # JSON is YAML
    port = _free_port()
    command = [exe, "-c", _RUN, "--config", f.name, "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    base = f"http://127.0.0.1:{port}"
    server = OwnedServer(command, answers(base, "/health/liveliness"), "LiteLLM's proxy", START_TIMEOUT, env,
                         os.path.join(log_dir, "litellm.log"))  # fmt: skip
    try:
        with server:
            yield server, key
    except RuntimeError as exc:
        if server.url:  # it ran: the failure is the bench's own
            raise
        raise Unavailable(str(exc)) from None
