"""Aligning another machine's clock with ours, for a load test spread over several (`--ray`).

Each generator times its requests with its own `time.monotonic_ns()`, and the monotonic clocks
of two machines have nothing in common (each counts from its own boot). So the driver asks
a node's actor for its clock a few times, notes its own clock just before asking and just after
the answer, and keeps the quickest round trip: the node read its clock somewhere inside that
round trip, so taking the middle is wrong by half the round trip at most. That bound is the
alignment error reported per node. Wall clocks are read too, only to report how far the node's
wall clock is from ours (NTP skew); they are never used to time anything.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

ROUNDS = 8


class Reading(msgspec.Struct, frozen=True):
    """One round trip: our monotonic clock when we asked and when the answer came, and our wall clock
    when we asked; the node's monotonic and wall clocks (ns), read in between."""

    asked: int
    answered: int
    asked_wall: int
    node_monotonic: int
    node_wall: int


class Alignment(msgspec.Struct, frozen=True):
    """`offset_ns`: the node's monotonic clock minus ours, within `error_s` (half of `rtt_s`, the
    quickest round trip); `wall_skew_s`: the node's wall clock minus ours, as well as it can be told."""

    offset_ns: int
    error_s: float
    rtt_s: float
    wall_skew_s: float

    def to_node(self, ours: int) -> int:
        """Our monotonic time `ours` on the node's clock."""
        return ours + self.offset_ns

    def report(self, drift_ns: int) -> dict[str, Any]:
        """What results.json says of the node's clock over a point, with `drift_ns`, how much the
        offset moved from the point's start to its end (the records use the start's)."""
        return {"offset_s": round(self.offset_ns / 1e9, 6), "error_s": round(self.error_s, 6),
                "rtt_s": round(self.rtt_s, 6), "drift_s": round(drift_ns / 1e9, 6),
                "wall_skew_s": round(self.wall_skew_s, 6)}  # fmt: skip


def estimate(readings: list[Reading]) -> Alignment:
    """The offsets from the quickest round trip: the node's readings against the middle of it."""
    best = min(readings, key=lambda r: r.answered - r.asked)
    half = (best.answered - best.asked) // 2
    return Alignment(
        offset_ns=best.node_monotonic - (best.asked + half),
        error_s=half / 1e9,
        rtt_s=(best.answered - best.asked) / 1e9,
        wall_skew_s=(best.node_wall - (best.asked_wall + half)) / 1e9,
    )


async def align(actor: Any, rounds: int = ROUNDS) -> Alignment:
    """Read the node actor's clocks (its `clock()` method) `rounds` times, one after another."""
    readings = []
    for _ in range(rounds):
        asked_wall, asked = time.time_ns(), time.monotonic_ns()
        node_monotonic, node_wall = await actor.clock.remote()
        readings.append(Reading(asked, time.monotonic_ns(), asked_wall, node_monotonic, node_wall))
    return estimate(readings)
