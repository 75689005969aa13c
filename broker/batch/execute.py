"""One batch item through a pool, under a lane: the same code on one machine and on each Ray node.

A 429/529 that outlasts the pool's retries halves the lane's limit, pauses it for the
provider's retry-after, and the item is sent again, up to its retry budget; its last
answer is then its result.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..client.client import AsyncClient
from ..errors import IsopoolError, ProviderStatusError, RequestError
from ..protocol import Snapshot
from .formats import Item, failed, provider_failed, succeeded
from .lane import Lane

_DEC = msgspec.json.Decoder()
_ENC = msgspec.json.Encoder()

THROTTLED = (429, 529)


class Counters(msgspec.Struct, frozen=True):
    """What a run counted on one pool (a Ray node sends its own to the dealer), or on all of them."""

    stalls: int = 0  # stalls the pool detected and recovered from
    retries: int = 0  # the pool's transparent retries
    throttled: int = 0  # 429/529 answers after the pool's retries
    batch_retries: int = 0  # throttled requests sent again by the runner
    lowest_concurrency: int = 0

    @staticmethod
    def total(parts: list[Counters]) -> Counters:
        return Counters(
            stalls=sum(p.stalls for p in parts),
            retries=sum(p.retries for p in parts),
            throttled=sum(p.throttled for p in parts),
            batch_retries=sum(p.batch_retries for p in parts),
            lowest_concurrency=min((p.lowest_concurrency for p in parts), default=0),
        )


def stalls_between(before: Snapshot, after: Snapshot) -> int:
    return sum(after.stalls.values()) - sum(before.stalls.values())


class Settler:
    """Runs items to their result lines and counts the throttled answers and re-sends."""

    def __init__(self, client: AsyncClient, lane: Lane, retry_budget: int) -> None:
        self.client, self.lane, self.retry_budget = client, lane, retry_budget
        self.throttled = 0
        self.batch_retries = 0

    async def __call__(self, item: Item, holding: bool = False) -> dict[str, Any]:
        """The item's result line; `holding` when the caller already acquired its lane slot."""
        attempt = 0
        while True:
            if not holding:
                await self.lane.acquire(estimate_tokens(item) if self.lane.tpm else 0)
            holding = False
            record, retry_after = await answer(self.client, item)
            await self.lane.release(retry_after is not None, retry_after or 0.0)
            if retry_after is None:
                return record
            self.throttled += 1
            if attempt >= self.retry_budget:
                return record
            self.batch_retries += 1
            attempt += 1

    def counters(self, before: Snapshot, after: Snapshot) -> Counters:
        """This run's counters: the pool's between two of its snapshots, and the settler's own."""
        return Counters(
            stalls_between(before, after),
            after.retries - before.retries,
            self.throttled,
            self.batch_retries,
            self.lane.lowest,
        )


async def answer(client: AsyncClient, item: Item) -> tuple[dict[str, Any], float | None]:
    """Run one item once: its result line, and the retry-after if the provider throttled it."""
    try:
        call = await client.submit(item.kind, item.method, **item.params)
        result = await call.result()
        return succeeded(item, result.status, result.headers, _DEC.decode(result.body)), None
    except ProviderStatusError as exc:
        info = exc.info
        body = _DEC.decode(info.body) if info.body else {"message": info.message}
        record = provider_failed(item, info.status or 0, info.headers, body)
        return record, _retry_after(info.headers) if info.status in THROTTLED else None
    except RequestError as exc:  # its str() starts with its code, which the result shows apart
        return failed(item, str(exc.code), exc.info.message, item.kind), None
    except IsopoolError as exc:
        return failed(item, "error", str(exc), item.kind), None


def estimate_tokens(item: Item) -> int:
    """Input (about 4 bytes a token) plus the output the request allows: what a tpm limit counts."""
    params = item.params
    output = params.get("max_tokens") or params.get("max_completion_tokens") or params.get("max_output_tokens") or 0
    return len(_ENC.encode(params)) // 4 + int(output)


def _retry_after(headers: list[tuple[str, str]]) -> float:
    for key, value in headers:
        if key.lower() == "retry-after":
            try:
                return min(60.0, max(0.0, float(value)))
            except ValueError:
                return 1.0
    return 1.0
