"""The gateway's model of one replica's prefix cache: prefix-chunk hashes it was sent.

The gateway cannot see a replica's cache, but it knows which prompts it sent there. A
bounded LRU of their chained prefix hashes (strata.routing.prompt) approximates what the
replica still holds; its capacity follows the replica's KV size, so the model forgets at
about the rate the replica evicts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    """LRU set of chained prefix hashes."""

    def __init__(self, capacity: int) -> None:
        """``capacity`` is in prefix chunks; 0 disables the index."""
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.capacity = max(0, capacity)

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading chunks of a prompt are in the index (does not touch recency)."""
        n = 0
        lru = self._lru
        for h in hashes:
            if h not in lru:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        """Record that a prompt with these chunk hashes was sent to the replica."""
        if self.capacity == 0:
            return
        lru = self._lru
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > self.capacity:
            lru.popitem(last=False)

    def resize(self, capacity: int) -> None:
        """Follow the replica's reported KV size."""
        self.capacity = max(0, capacity)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
