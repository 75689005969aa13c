"""The usage the fake provider reported, summed over its answers: what a pool's token accounts must
equal. Per answer, the counts of the last event written that carried usage (the usage of the three
APIs is cumulative: Anthropic's `message_start` says 1 output token, its `message_delta` the total);
an answer cut before any such event reported nothing. Input counts every prompt token, cached too."""

from __future__ import annotations

from typing import Any

from .content import Reply

FIELDS = ("input", "output", "cache_read", "cache_write")


class Reported:
    def __init__(self) -> None:
        self.totals = dict.fromkeys(FIELDS, 0)

    def reset(self) -> None:
        self.totals = dict.fromkeys(FIELDS, 0)

    def answered(self, reply: Reply, written: list[tuple[Any, Any]]) -> None:
        """`written`: the (name, data) events of `reply` that went out (a whole body: one event)."""
        output = next((out for _, data in reversed(written) if (out := _output(data)) is not None), None)
        if output is None:
            return
        for field, count in zip(FIELDS, (reply.input_tokens, output, reply.cached_tokens, reply.cache_writes),
                                strict=True):  # fmt: skip
            self.totals[field] += count


def _output(data: Any) -> int | None:
    """The output tokens an event (or body) reports, or None if it carries no usage."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage") or (data.get("message") or {}).get("usage") or (data.get("response") or {}).get("usage")
    if not usage:
        return None
    return usage.get("output_tokens", usage.get("completion_tokens"))
