"""Deterministic replies: the same request body always produces the same bytes.

A test can then check that a retried answer is complete and byte-identical to an
unfaulted one, because ids, timestamps and text are all derived from the body.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

_WORDS = (
    "the pool kills stalled streams and retries them on a fresh worker so nothing hangs "
    "while keep alive pings arrive every process starts clean from the zygote and answers once"
).split()

FIXED_CREATED = 1_767_225_600  # 2026-01-01, so that retried answers are byte-identical


class Reply:
    """The text, ids and token counts of one answer."""

    def __init__(self, body: dict[str, Any], tokens: int) -> None:
        digest = hashlib.sha256(json.dumps(_content_key(body), sort_keys=True).encode()).hexdigest()
        self.key = digest
        rng = random.Random(digest)
        limit = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
        count = max(1, min(tokens, int(limit))) if limit else max(1, tokens)
        self.pieces = [("" if i == 0 else " ") + rng.choice(_WORDS) for i in range(count)]
        self.text = "".join(self.pieces)
        self.model = str(body.get("model", "fake-model"))
        self.input_tokens = max(1, len(json.dumps(body.get("messages", body.get("input", ""))).split()))
        self.output_tokens = count
        self.stopped_by_limit = bool(limit) and count < tokens

    def ident(self, prefix: str) -> str:
        return f"{prefix}{self.key[:24]}"


def _content_key(body: dict[str, Any]) -> dict[str, Any]:
    """What decides the answer: everything but transport flags."""
    return {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
