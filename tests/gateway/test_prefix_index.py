from __future__ import annotations

from strata.gateway.prefix_index import PrefixIndex


def test_match_counts_leading_chunks_only() -> None:
    idx = PrefixIndex(100)
    idx.insert([1, 2, 3], 0.0)
    assert idx.match([1, 2, 3, 4]) == 3
    assert idx.match([1, 9, 3]) == 1
    assert idx.match([9, 1]) == 0
    assert idx.match([]) == 0


def test_lru_eviction_and_resize() -> None:
    idx = PrefixIndex(4)
    idx.insert([1, 2], 0.0)
    idx.insert([3, 4], 0.0)
    idx.insert([1], 0.0)  # refresh 1
    idx.insert([5], 0.0)  # evicts 2, the least recent
    assert idx.match([1]) == 1 and idx.match([2]) == 0
    idx.resize(2)
    assert len(idx) == 2 and idx.match([5]) == 1
    off = PrefixIndex(0)
    off.insert([1], 0.0)
    assert off.match([1]) == 0
