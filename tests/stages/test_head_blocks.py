"""The head's block manager: cached blocks serve only sequences on the path that wrote them."""

from __future__ import annotations

from strata.engine.sampling import SamplingParams
from strata.engine.sequence import Sequence
from strata.stages.head import PathBlockManager

P = SamplingParams()


def _written(bm: PathBlockManager, seq: Sequence) -> None:
    bm.match_prefix(seq)
    assert bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)
    bm.free_sequence(seq)


def test_prefix_hits_are_trimmed_to_the_writing_path() -> None:
    paths = {1: ("a:1",), 2: ("b:1",), 3: ("a:1",), 4: ("b:1",)}
    bm = PathBlockManager(16, 4, True, paths.get)
    prompt = list(range(12))
    _written(bm, Sequence(1, prompt + [50], P))  # three full blocks cached, written via a:1
    free = bm.num_free_blocks
    other = Sequence(2, prompt + [60], P)
    assert bm.match_prefix(other) == 0  # same tokens, other path: its KV is not there
    assert other.block_table == [] and other.num_computed_tokens == 0
    assert bm.num_free_blocks == free and bm.stats().hit_tokens == 0
    same = Sequence(3, prompt + [70], P)
    assert bm.match_prefix(same) == 12 and len(same.block_table) == 3
    assert bm.stats().hit_tokens == 12
    bm.free_sequence(same)


def test_blocks_reused_by_another_path_change_owner() -> None:
    paths = {1: ("a:1",), 2: ("b:1",), 3: ("a:1",)}
    bm = PathBlockManager(4, 4, True, paths.get)
    prompt = list(range(12))
    _written(bm, Sequence(1, prompt + [50], P))  # 4 blocks: 3 cached + 1 partial
    # Path b needs 3 blocks: the uncached one, then the two least recently used cached ones.
    _written(bm, Sequence(2, [80] * 12, P))
    assert sorted(bm.owner.count(p) for p in (("a:1",), ("b:1",))) == [1, 3]
    again = Sequence(3, prompt + [70], P)
    assert bm.match_prefix(again) == 4  # only the first block is still path a's
    assert all(bm.owner[b] == ("a:1",) for b in again.block_table)


def test_single_path_keeps_the_whole_prefix_cache() -> None:
    bm = PathBlockManager(8, 4, True, lambda _sid: ("x:1",))
    _written(bm, Sequence(1, list(range(9)), P))
    seq = Sequence(2, list(range(8)), P)
    # Every prompt token cached: the last one is recomputed so the model yields logits.
    assert bm.match_prefix(seq) == 7 and seq.num_computed_tokens == 7
