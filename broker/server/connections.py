"""What the broker keeps per client connection (a ZeroMQ identity on the frontend).

Each connection gets a bounded share of the pool (`client_queue_limit` requests in flight,
holding at most `client_queue_bytes_limit` bytes of requests) and, if configured, a request
rate (`client_rate` per second, in bursts of up to `client_burst`): one caller flooding the
frontend is refused before it can fill the queue that everyone shares. Answers to a
connection that stopped reading (its send buffer is full) are parked here, so that its
requests still end in exactly one answer if it resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol import Code


@dataclass(eq=False, slots=True)
class Connection:
    tokens: float
    refilled_at: float
    in_flight: int = 0
    held_bytes: int = 0  # request payloads of its requests in flight, which the broker holds
    parked: list[list[bytes]] | None = None  # final answers it could not take yet (it stopped reading)
    parked_at: float = 0.0


@dataclass(slots=True)
class Connections:
    rate: float  # requests per second per connection; 0 = unlimited
    burst: int
    limit: int  # requests in flight per connection
    byte_limit: int  # bytes of requests held per connection
    _all: dict[bytes, Connection] = field(default_factory=dict)

    def get(self, client: bytes) -> Connection | None:
        return self._all.get(client)

    def _entry(self, client: bytes, now: float) -> Connection:
        conn = self._all.get(client)
        if conn is None:
            conn = self._all[client] = Connection(float(self.burst), now)
        return conn

    def admit(self, client: bytes, now: float, size: int) -> tuple[Code, str] | None:
        """Why a new request of `size` bytes from `client` is refused, or None (then it counts as in flight)."""
        conn = self._entry(client, now)
        if conn.parked is not None:
            return Code.SATURATED, "this connection stopped reading its answers; earlier answers are waiting for it"
        if conn.in_flight >= self.limit:
            return Code.SATURATED, f"this connection has {conn.in_flight} requests in flight (client_queue_limit)"
        if conn.held_bytes + size > self.byte_limit:
            return Code.SATURATED, (
                f"this connection's requests in flight hold {conn.held_bytes} bytes; {size} more would pass "
                "client_queue_bytes_limit: wait for answers, or send smaller requests"
            )
        if self.rate:
            conn.tokens = min(float(self.burst), conn.tokens + (now - conn.refilled_at) * self.rate)
            conn.refilled_at = now
            if conn.tokens < 1.0:
                wait = (1.0 - conn.tokens) / self.rate
                return Code.RATE_LIMITED, f"over client_rate of {self.rate:g} requests/s; retry in {wait:.3f}s"
            conn.tokens -= 1.0
        conn.in_flight += 1
        conn.held_bytes += size
        return None

    def done(self, client: bytes, size: int) -> None:
        conn = self._all.get(client)
        if conn is not None:
            conn.in_flight -= 1
            conn.held_bytes -= size

    def park(self, client: bytes, frames: list[bytes] | None, now: float) -> None:
        conn = self._entry(client, now)
        if conn.parked is None:
            conn.parked, conn.parked_at = [], now
        if frames is not None:
            conn.parked.append(frames)

    def parked(self) -> list[tuple[bytes, Connection]]:
        return [(client, conn) for client, conn in self._all.items() if conn.parked is not None]

    def unpark(self, client: bytes) -> None:
        conn = self._all.get(client)
        if conn is not None:
            conn.parked = None

    def forget(self, client: bytes) -> None:
        self._all.pop(client, None)

    def prune(self, now: float) -> None:
        """Drop connections with nothing in flight, nothing parked and a full bucket (they look new)."""
        full = float(self.burst)
        for client, conn in list(self._all.items()):
            if conn.in_flight or conn.parked is not None:
                continue
            if not self.rate or conn.tokens + (now - conn.refilled_at) * self.rate >= full:
                del self._all[client]

    def __len__(self) -> int:
        return len(self._all)
