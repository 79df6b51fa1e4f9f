"""Property tests: no block leaks or is double-freed under any mix of block-manager calls."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from strata.engine.kv_cache import BlockManager
from strata.engine.sampling import SamplingParams
from strata.engine.sequence import Sequence

NUM_BLOCKS, BLOCK_SIZE = 12, 4
# Few distinct prefixes, so prompts share cached blocks often.
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5]]


def check_pool(bm: BlockManager, tables: list[list[int]]) -> None:
    """Every block is free or used, exactly once; refcounts equal the tables holding it."""
    free = bm.free_blocks()
    assert len(free) == len(set(free)), "a block is in the free lists twice"
    assert not set(bm.free_uncached) & set(bm.free_cached), "a block in both free lists"
    holders = [0] * bm.num_blocks
    for table in tables:
        assert len(table) == len(set(table)), "a table holds a block twice"
        for b in table:
            holders[b] += 1
    assert bm.ref_counts == holders
    used = {b for b in range(bm.num_blocks) if holders[b] > 0}
    assert used.isdisjoint(free) and len(used) + len(free) == bm.num_blocks
    for h, b in bm.cached.items():
        assert bm.block_hashes[b] == h and bm.block_tokens[b] is not None


class BlockManagerMachine(RuleBasedStateMachine):
    """Admit (with prefix matching), grow, compute, commit, unmatch and free sequences."""

    window: int | None = None  # set: give back blocks before a sliding window after each step

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, sliding_window=self.window)
        self.live: list[Sequence] = []
        self.next_id = 0

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 3), max_size=9))
    def admit(self, prefix: list[int], tail: list[int]) -> None:
        seq = Sequence(self.next_id, prefix + tail, SamplingParams())
        self.next_id += 1
        self.bm.match_prefix(seq)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), grow=st.integers(1, 10))
    def compute(self, data: st.DataObject, grow: int) -> None:
        """Allocate for some more tokens; on success compute them (sampling past the prompt)."""
        seq = data.draw(st.sampled_from(self.live))
        n = min(seq.num_computed_tokens + grow, seq.num_tokens + 1)
        before = list(seq.block_table)
        if not self.bm.allocate(seq, n):
            assert seq.block_table == before  # a failed allocation changes nothing
            return
        if n > seq.num_tokens:
            seq.output_token_ids.append(data.draw(st.integers(0, 3)))
        seq.num_computed_tokens = n
        self.bm.commit(seq)
        self.bm.release_before_window(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def unmatch_and_rematch(self, data: st.DataObject) -> None:
        """A sequence that could not be admitted after all, then admitted again."""
        seq = data.draw(st.sampled_from(self.live))
        self.bm.unmatch(seq)
        assert seq.block_table == []
        self.bm.match_prefix(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free_sequence(seq)

    @invariant()
    def pool_is_consistent(self) -> None:
        # Blocks given back stay in a table (masked there) but are no longer held by it.
        check_pool(self.bm, [s.block_table[s.num_released_blocks :] for s in self.live])
        for s in self.live:  # a table never holds more blocks than its tokens need
            assert len(s.block_table) * BLOCK_SIZE < s.num_tokens + 1 + BLOCK_SIZE
            # Nothing the next query may still attend to was given back.
            first_needed = s.num_computed_tokens - (self.window or s.num_computed_tokens + 1) + 1
            assert s.num_released_blocks * BLOCK_SIZE <= max(0, first_needed)

    def teardown(self) -> None:
        for seq in self.live:
            self.bm.free_sequence(seq)
        assert self.bm.num_free_blocks == NUM_BLOCKS and not any(self.bm.ref_counts)


BlockManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                                 deadline=None)
TestBlockManager = BlockManagerMachine.TestCase


class SlidingWindowMachine(BlockManagerMachine):
    """The same calls with blocks before a 5-token window given back as sequences run."""

    window = 5


SlidingWindowMachine.TestCase.settings = BlockManagerMachine.TestCase.settings
TestBlockManagerSlidingWindow = SlidingWindowMachine.TestCase
