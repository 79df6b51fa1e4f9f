"""Block manager: allocation, freeing, prefix-cache hits, LRU eviction."""

from __future__ import annotations

from strata.engine.kv_cache import BlockManager
from strata.engine.sampling import SamplingParams
from strata.engine.sequence import Sequence


def seq(i: int, tokens: list[int], **kw) -> Sequence:
    return Sequence(i, tokens, SamplingParams(**kw))


def finish_prefill(bm: BlockManager, s: Sequence) -> None:
    assert bm.allocate(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)


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
