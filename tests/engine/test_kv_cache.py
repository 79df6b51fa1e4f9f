"""Block manager: allocation, freeing, prefix-cache hits, LRU eviction."""

from __future__ import annotations

import hashlib
import random
import struct
from collections import OrderedDict

import pytest

from strata.engine import kv_cache
from strata.engine.kv_cache import BlockManager, block_hash
from strata.engine.sampling import SamplingParams
from strata.engine.sequence import Sequence


def seq(i: int, tokens: list[int], **kw) -> Sequence:
    return Sequence(i, tokens, SamplingParams(**kw))


def finish_prefill(bm: BlockManager, s: Sequence) -> None:
    assert bm.allocate(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)


def test_block_keys_are_a_sha256_chain_over_int64_token_ids() -> None:
    """Keys are SHA-256 of (parent digest, little-endian int64 ids): reproducible anywhere."""
    root = block_hash(None, (1, 2, 3, 4))
    assert root == hashlib.sha256(struct.pack("<4q", 1, 2, 3, 4)).digest()
    child = block_hash(root, [5, 6, 7, 8])
    assert child == hashlib.sha256(root + struct.pack("<4q", 5, 6, 7, 8)).digest()
    assert block_hash(None, (5, 6, 7, 8)) != child  # the chain makes the key name the prefix
    assert block_hash(None, (2, 1, 3, 4)) != root


def test_a_key_collision_never_serves_another_prompts_blocks(monkeypatch) -> None:
    """Even if two blocks' keys collided, a hit also needs the stored token ids to match."""
    monkeypatch.setattr(kv_cache, "block_hash", lambda parent, tokens: b"collision")
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(0, [1, 2, 3, 4, 9])
    bm.match_prefix(a)
    finish_prefill(bm, a)
    b = seq(1, [5, 6, 7, 8, 9])
    assert bm.match_prefix(b) == 0 and b.block_table == []
    c = seq(2, [1, 2, 3, 4, 9])
    assert bm.match_prefix(c) == 4 and c.block_table == a.block_table[:1]


def test_allocate_and_free_returns_every_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(0, list(range(10)))
    bm.match_prefix(s)
    assert bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free_sequence(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_allocation_fails_without_partial_change() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(0, list(range(12)))
    bm.match_prefix(s)
    assert not bm.allocate(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_blocks_and_counts() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(0, list(range(10)))
    bm.match_prefix(a)
    finish_prefill(bm, a)
    b = seq(1, list(range(8)) + [99, 98, 97])
    hit = bm.match_prefix(b)
    assert hit == 8
    assert b.block_table == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    assert bm.stats().hit_tokens == 8
    # A different first block breaks the chain even if later blocks match.
    c = seq(2, [7, 7, 7, 7] + list(range(4, 8)))
    assert bm.match_prefix(c) == 0


def test_full_hit_leaves_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(0, list(range(8)))
    bm.match_prefix(a)
    finish_prefill(bm, a)
    bm.free_sequence(a)
    b = seq(1, list(range(8)))
    assert bm.match_prefix(b) == 7
    assert b.num_computed_tokens == 7


def test_freed_cached_blocks_are_evicted_lru_after_uncached() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq(0, [1, 2, 3, 4])
    bm.match_prefix(a)
    finish_prefill(bm, a)
    cached = set(a.block_table)
    bm.free_sequence(a)
    assert bm.num_free_blocks == 4
    # Two uncached blocks are taken first; cached prefix survives.
    b = seq(1, [9, 9, 9])
    bm.match_prefix(b)
    assert bm.allocate(b, 3)
    assert not (set(b.block_table) & cached)
    c = seq(2, [1, 2, 3, 4, 5])
    assert bm.match_prefix(c) == 4
    # Exhaust: the cache must evict when nothing else is free.
    bm.free_sequence(b)
    bm.free_sequence(c)
    d = seq(3, list(range(100, 108)))
    bm.match_prefix(d)
    assert bm.allocate(d, 8)
    e = seq(4, [1, 2, 3, 4, 5])
    bm.free_sequence(d)
    assert bm.match_prefix(e) == 0


def test_prompt_logprobs_bypass_the_prefix_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq(0, [1, 2, 3, 4])
    bm.match_prefix(a)
    finish_prefill(bm, a)
    b = seq(1, [1, 2, 3, 4], prompt_logprobs=1)
    assert bm.match_prefix(b) == 0


class _ReferenceBlockManager(BlockManager):
    """The free list as one OrderedDict (the straightforward definition) for comparison."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.free = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def free_blocks(self) -> list[int]:
        return list(self.free)

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        for _ in range(need):
            block, _ = self.free.popitem(last=False)
            h = self.block_hashes[block]
            if h is not None:
                if self.cached.get(h) == block:
                    del self.cached[h]
                self.block_hashes[block] = None
                self.block_tokens[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def free_sequence(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.block_hashes[block] is None:
                    self.free.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_free_lists_match_the_single_ordered_dict(caching: bool, seed: int) -> None:
    """The stack + LRU free lists give the same blocks, in the same order, as one list."""
    rng = random.Random(seed)
    bms = [BlockManager(24, 4, caching), _ReferenceBlockManager(24, 4, caching)]
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(1, 30))] for _ in range(40)]
    live: list[list[Sequence]] = [[], []]
    for step in range(600):
        op = rng.random()
        if op < 0.3 or not live[0]:
            tokens = rng.choice(prompts)
            pair = [seq(step, list(tokens)) for _ in bms]
            hits = [bm.match_prefix(s) for bm, s in zip(bms, pair, strict=True)]
            assert hits[0] == hits[1]
            for side, s in enumerate(pair):
                live[side].append(s)
        else:
            i = rng.randrange(len(live[0]))
            pair = [live[0][i], live[1][i]]
            if op < 0.7:
                n = pair[0].num_computed_tokens + rng.randrange(1, 12)
                got = [bm.allocate(s, n) for bm, s in zip(bms, pair, strict=True)]
                assert got[0] == got[1]
                if got[0]:
                    sampled = [rng.randrange(3) for _ in range(n - pair[0].num_tokens)]
                    for bm, s in zip(bms, pair, strict=True):
                        s.output_token_ids += sampled
                        s.num_computed_tokens = n
                        bm.commit(s)
            elif op < 0.75:
                for bm, s in zip(bms, pair, strict=True):
                    bm.unmatch(s)
                    bm.match_prefix(s)
            else:
                for side, (bm, s) in enumerate(zip(bms, pair, strict=True)):
                    bm.free_sequence(s)
                    live[side].pop(i)
        a, b = bms
        assert a.free_blocks() == b.free_blocks()
        assert a.num_free_blocks == b.num_free_blocks
        assert a.ref_counts == b.ref_counts and a.block_hashes == b.block_hashes
        assert a.cached == b.cached
        assert [s.block_table for s in live[0]] == [s.block_table for s in live[1]]
