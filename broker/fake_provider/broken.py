"""The faults that break a stream's framing rather than its timing: its events as such a fault
sends them (`cut`, `no-done`, `malformed`), every other stream as it is."""

from __future__ import annotations

from typing import Any

import msgspec

from .faults import Fault
from .formats import SseEvent

_ENC = msgspec.json.Encoder()


def shaped(fmt: Any, events: list[SseEvent], fault: Fault | None) -> list[SseEvent]:
    """`events` of format `fmt` as `fault` sends them."""
    if fault is None:
        return events
    if fault.kind == "cut":  # no terminal event, then a clean end
        end = fmt.ending(events)
        return events[: end if fault.after is None else min(fault.after, end)]
    if fault.kind == "no-done":
        return [event for event in events if event[1] != "[DONE]"]
    if fault.kind == "malformed":  # the next event cut in half, as a line that is not JSON, before it
        at = min(fault.before, len(events) - 1)
        name, data = events[at]
        whole = data.encode() if isinstance(data, str) else _ENC.encode(data)
        return [*events[:at], (name, whole[: len(whole) // 2].decode(errors="ignore")), *events[at:]]
    return events
