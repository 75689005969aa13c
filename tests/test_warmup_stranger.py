"""The warm-up's provider socket is an abstract Unix socket, which any local
user can reach (its name is the process id and a count, and /proc/net/unix lists it). The warm-up waited for every
connection to it to close: one from another user that never sent a byte held it for ever, the zygote's preload
(no pool could start) or a replacement worker's warm-up. A stranger's connection is now closed at once."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

from worker import warmup

# Another process connects to the name as soon as it is bound, and holds the connection open, saying nothing.
_HOLDER = """
import socket, sys, time
name = b"\\0" + sys.argv[1].encode()
print("ready", flush=True)
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(name)
        break
    except OSError:
        s.close()
        time.sleep(0.0005)
print("connected", flush=True)
time.sleep(60)
"""


def test_a_local_strangers_silent_connection_does_not_hold_the_warm_up(monkeypatch):
    count = int(re.fullmatch(r"count\((\d+)\)", repr(warmup._NAMES))[1])  # the next socket's number
    name = f"isopool-warm-up-{os.getpid()}-{count}"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, name], stdout=subprocess.PIPE, text=True)
    bind = asyncio.start_unix_server

    async def bound_then_reached(*args, **kwargs):
        """The warm-up's socket, once the stranger has reached it: on a busy machine the warm-up could
        otherwise be over before the stranger ran at all (and the test prove nothing)."""
        server = await bind(*args, **kwargs)
        assert await asyncio.to_thread(holder.stdout.readline) == "connected\n"
        return server

    monkeypatch.setattr(warmup.asyncio, "start_unix_server", bound_then_reached)
    try:
        assert holder.stdout.readline().strip() == "ready"

        async def warm() -> None:
            await asyncio.wait_for(warmup.calls(("anthropic",)), 20)

        asyncio.run(warm())  # TimeoutError before the fix: it waited on the stranger's connection
    finally:
        holder.kill()
        holder.wait()
