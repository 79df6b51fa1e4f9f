"""Paged KV-cache bookkeeping: block pool, block tables and the automatic prefix cache.

Pure: this module only counts and hashes blocks (no tensors, no clock), so the
simulator drives it unchanged. A full block is keyed by a hash chain over its
token ids and every token before it; blocks are shared with reference counts,
and free blocks that still hold a cached prefix are evicted least recently used.

The chain is SHA-256, not Python's ``hash()``: a key collision would hand one
request another request's KV (another tenant's prompt), and a 64-bit
non-cryptographic hash of attacker-chosen token ids can be collided on purpose
(vLLM's CVE-2025-25183). A hit also compares the stored token ids, so even a
collision could only match a block holding the same tokens.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as IntSequence
from dataclasses import dataclass

from strata.engine.sequence import Sequence

# One precompiled little-endian int64 packer per block length: packing a tuple with a
# compiled Struct is several times cheaper than array("q", tuple) or a fresh format string.
_PACKERS: dict[int, Callable[..., bytes]] = {}


def block_hash(parent: bytes | None, tokens: IntSequence[int]) -> bytes:
    """SHA-256 of a full block chained on its parent's digest (equal digests: equal prefixes).

    Token ids are packed as fixed-width little-endian signed 64-bit integers, so the byte
    string is unambiguous and the same on every machine (a root block is 8 * block_size
    bytes, a child 32 more for its parent's digest).
    """
    pack = _PACKERS.get(len(tokens))
    if pack is None:
        pack = _PACKERS[len(tokens)] = struct.Struct(f"<{len(tokens)}q").pack
    data = pack(*tokens)
    return hashlib.sha256(parent + data if parent is not None else data).digest()


def chain_root(seq: Sequence) -> bytes | None:
    """The parent of a sequence's first block: None, or a digest of its LoRA adapter's id.

    KV computed under an adapter differs from the base model's for the same tokens, so a
    sequence with an adapter hashes its chain from a root of its own (vLLM keys blocks on
    the LoRA too). The id is unique per load, so a reloaded adapter never meets old KV.
    """
    lora_id = seq.params.lora_id
    if not lora_id:
        return None
    return hashlib.sha256(b"strata-lora-root\0" + lora_id.to_bytes(8, "little")).digest()


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """Lifetime prompt-token counts seen by the prefix cache."""

    queried_tokens: int
    hit_tokens: int

    @property
    def hit_rate(self) -> float:
        """Cached prompt tokens over prompt tokens looked up."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    """Allocates fixed-size KV blocks to sequences and shares cached prefixes."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError("sliding_window must be positive (or None)")
        # Set when every layer attends over the last sliding_window positions only: blocks
        # wholly before the window are given back while the sequence runs.
        self.sliding_window = sliding_window
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        # Free blocks in eviction order: uncached ones first, then cached ones LRU-first.
        # Uncached free blocks only ever enter and leave at the front, so they are a stack
        # (a list whose end is the front: slices and appends, not one dict operation per
        # block); cached ones are an LRU that lookups also remove from.
        self.free_uncached: list[int] = list(range(num_blocks - 1, -1, -1))
        self.free_cached: OrderedDict[int, None] = OrderedDict()
        self.queried_tokens = 0
        self.hit_tokens = 0
        # Hashes of blocks evicted from the prefix cache since the owner last emptied this
        # list (None: not tracked); the engine's prefix registry follows the cache by it.
        self.evicted: list[bytes] | None = None

    # -- capacity ---------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks with no user (cached-but-free ones count as free: they are evictable)."""
        return len(self.free_uncached) + len(self.free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def free_blocks(self) -> list[int]:
        """Free block ids in the order they will be reused (for tests and debugging)."""
        return self.free_uncached[::-1] + list(self.free_cached)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that `num_tokens` tokens fit in its table."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def stats(self) -> PrefixCacheStats:
        """Prefix-cache hit counters."""
        return PrefixCacheStats(self.queried_tokens, self.hit_tokens)

    # -- allocation -------------------------------------------------------------
    def _evict_lru(self, n: int) -> list[int]:
        """Take the n least recently used cached free blocks, dropping their prefixes."""
        pop = self.free_cached.popitem
        hashes = self.block_hashes
        cached = self.cached
        taken = []
        for _ in range(n):
            block, _ = pop(last=False)
            h = hashes[block]
            if cached.get(h) == block:
                del cached[h]
                if self.evicted is not None:
                    self.evicted.append(h)
            hashes[block] = None
            self.block_tokens[block] = None
            taken.append(block)
        return taken

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_cached[block]  # a block found by its hash is a cached one
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        """Drop one reference; a block nobody uses becomes free (uncached ones reused first)."""
        n = self.ref_counts[block] - 1
        self.ref_counts[block] = n
        if n == 0:
            if self.block_hashes[block] is None:
                self.free_uncached.append(block)
            else:
                self.free_cached[block] = None

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks of seq's prompt; return the number of tokens they cover.

        Called once when a sequence is admitted with an empty block table. At least
        one prompt token is always left to compute, so the model yields logits.
        """
        assert not seq.block_table
        n_prompt = seq.num_prompt_tokens
        self.queried_tokens += n_prompt
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0
        parent = chain_root(seq)
        hits: list[int] = []
        hashes: list[bytes] = []
        for start in range(0, n_prompt - self.block_size + 1, self.block_size):
            tokens = tuple(seq.prompt_token_ids[start : start + self.block_size])
            h = block_hash(parent, tokens)
            block = self.cached.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            hits.append(block)
            hashes.append(h)
            parent = h
        for block in hits:
            self._ref(block)
        seq.block_table.extend(hits)
        seq.block_hashes = hashes
        seq.num_hashed_blocks = len(hits)
        cached = len(hits) * self.block_size
        if cached >= seq.num_tokens:
            cached = seq.num_tokens - 1  # recompute the last token (same K/V rewritten)
        seq.num_cached_tokens = cached
        seq.num_computed_tokens = cached
        self.hit_tokens += cached
        return cached

    def unmatch(self, seq: Sequence) -> None:
        """Undo `match_prefix` for a sequence that could not be admitted after all."""
        self.queried_tokens -= seq.num_prompt_tokens
        self.hit_tokens -= seq.num_cached_tokens
        seq.num_cached_tokens = 0
        self.free_sequence(seq)

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether num_blocks free (or evictable) blocks exist."""
        return num_blocks <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens; False (no change) if full."""
        table = seq.block_table
        need = -(-num_tokens // self.block_size) - len(table)
        if need <= 0:
            return True
        stack = self.free_uncached
        if need == 1 and stack:  # a decode crossing into a new block
            block = stack.pop()
            self.ref_counts[block] = 1
            table.append(block)
            return True
        n_uncached = len(stack)
        if need <= n_uncached:
            # The front of the free order is the end of the stack: take it as one slice.
            cut = n_uncached - need
            taken = stack[cut:]
            del stack[cut:]
            taken.reverse()
        else:
            if need > n_uncached + len(self.free_cached):
                return False
            taken = stack[::-1]
            stack.clear()
            taken += self._evict_lru(need - n_uncached)
        refs = self.ref_counts
        for block in taken:
            refs[block] = 1
        table += taken
        return True

    def commit(self, seq: Sequence) -> None:
        """Register seq's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else chain_root(seq)
        for i in range(seq.num_hashed_blocks, full):
            tokens = tuple(seq.tokens(i * self.block_size, (i + 1) * self.block_size))
            h = block_hash(parent, tokens)
            block = seq.block_table[i]
            if h not in self.cached and self.block_hashes[block] is None:
                self.cached[h] = block
                self.block_hashes[block] = h
                self.block_tokens[block] = tokens
            seq.block_hashes.append(h)
            parent = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def release_before_window(self, seq: Sequence) -> None:
        """Give back seq's leading blocks that no later query can attend to.

        The next query sits at position num_computed_tokens and sees keys from
        num_computed_tokens - sliding_window + 1 on; later queries see less. Call after
        `commit`, so a full block given back keeps its hash: its content is still the
        K/V of its prefix, a valid prefix-cache hit for any sequence (the block goes to
        the evictable LRU like a finished sequence's). The ids stay in the table: the
        attention masks their positions, and the native kernel does not read them.
        """
        if self.sliding_window is None:
            return
        first_needed = seq.num_computed_tokens - self.sliding_window + 1
        dead = min(max(0, first_needed) // self.block_size, len(seq.block_table))
        for block in seq.block_table[seq.num_released_blocks : dead]:
            self.release(block)
        seq.num_released_blocks = max(seq.num_released_blocks, dead)

    def free_sequence(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody uses become free, cached ones stay hittable."""
        refs = self.ref_counts
        push = self.free_uncached.append
        cached = self.free_cached
        hashes = self.block_hashes
        for block in reversed(seq.block_table[seq.num_released_blocks :]):  # release(), inlined
            n = refs[block] - 1
            refs[block] = n
            if n == 0:
                # Uncached blocks are reused first, keeping cached prefixes longer.
                if hashes[block] is None:
                    push(block)
                else:
                    cached[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_released_blocks = 0
        seq.num_computed_tokens = 0
