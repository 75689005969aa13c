"""The fake provider's prefix cache: prompts it has seen, kept as a chain of blocks the way a
serving engine keeps its KV cache (vLLM's blocks, SGLang's radix tree), so that its `usage`
says how much of a prompt was cached, as a server with automatic prefix caching would.

A prompt is the words the fake counts as its input tokens (see `content.Reply`), cut into
blocks of BLOCK words; a block's key hashes the model, the key of the block before it and
its own words, so a block is found only after the same prefix. Only whole blocks count,
and never the prompt's last word (an engine computes at least one token to answer). The
least recently used blocks go first beyond `capacity`. The cost is one hash of BLOCK words
per block of a request's prompt, paid once per request, never per streamed event.
"""

from __future__ import annotations

from collections import OrderedDict

BLOCK = 16  # words per block: vLLM's default of 16 tokens
CAPACITY = 65_536  # blocks kept, about a million prompt words


class PrefixCache:
    def __init__(self, capacity: int = CAPACITY, block: int = BLOCK) -> None:
        self.capacity, self.block = capacity, block
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def admit(self, model: str, words: list[str]) -> tuple[int, int]:
        """Look the prompt up and keep its blocks: (words read from the cache, words newly written to it)."""
        size, blocks = self.block, self.blocks
        key, cached, written, leading = hash(model), 0, 0, True
        for start in range(0, (len(words) - 1) // size * size, size):
            key = hash((key, *words[start : start + size]))
            if key in blocks:
                blocks.move_to_end(key)
                cached += size if leading else 0
            else:
                leading = False
                blocks[key] = None
                written += size
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
        return cached, written

    def clear(self) -> None:
        self.blocks.clear()
