"""Prompt text that requests share, so that a server's prefix cache has something to find: blocks
of common words (about a token each) drawn from a key, the same key giving the same words in
every run. A Mooncake trace's hash_ids name its blocks of 512 tokens; `--prefix-tokens` gives
each request one of a few shared prefixes."""

from __future__ import annotations

import functools
import random

import msgspec

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue"
).split()
MOONCAKE_BLOCK = 512  # tokens per hash_id in Mooncake's traces
# the most tokens a run's prompt (or answer) may ask for: the largest context windows hold about 2M; more is
# a typo that would build gigabytes of prompt text before anything is sent
MAX_TOKENS = 2_000_000


@functools.lru_cache(maxsize=4096)
def block(key: str, words: int) -> tuple[str, ...]:
    """`words` words drawn from `key` (the most recently used blocks are kept: traces reuse theirs)."""
    return tuple(random.Random(key).choices(WORDS, k=words))


def from_hash_ids(hash_ids: list[int], length: int, salt: int) -> str:
    """A prompt of `length` words: the text of each hash id's block in turn (the last one cut short), so
    requests that share leading hash ids share their text; words of its own (from `salt`) where the ids
    cover fewer than `length`."""
    words: list[str] = []
    for hash_id in hash_ids:
        if len(words) >= length:
            break
        words.extend(block(f"hash {hash_id}", MOONCAKE_BLOCK))
    if len(words) < length:
        words.extend(random.Random(f"own {salt}").choices(WORDS, k=length - len(words)))
    return " ".join(words[:length])


class SharedPrefix(msgspec.Struct, frozen=True):
    """`groups` prefixes of `tokens` words; each conversation opens with one of them."""

    tokens: int
    groups: int = 1
    seed: int = 0

    def pick(self, rng: random.Random) -> str:
        return " ".join(block(f"prefix {self.seed} {rng.randrange(self.groups)}", self.tokens))
