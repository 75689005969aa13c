"""What a measurement says about where it ran: the machine, its load, and the versions of
the packages whose speed it measures (benchmarks and load tests record both)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import psutil


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu or platform.processor(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def versions() -> dict[str, str]:
    names = ("isopool", "anthropic", "openai", "pyzmq", "msgspec", "httpx2", "aiohttp", "pebble")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
