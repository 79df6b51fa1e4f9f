"""Property tests: the scheduler never leaks or double-frees a block, whatever the order of
adds, steps, aborts and the preemptions a small KV cache forces."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from strata.engine.kv_cache import BlockManager
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import Scheduler, SchedulerConfig
from strata.engine.sequence import Sequence, SequenceStatus
from tests.engine.test_kv_properties import check_pool

NUM_BLOCKS, BLOCK_SIZE = 10, 4  # small: long prompts force preemption
SHARED = [[7] * 8, [7] * 4 + [8] * 4]


class SchedulerMachine(RuleBasedStateMachine):
    """Drives the scheduler as the engine does, standing in for the model runner."""

    def __init__(self) -> None:
        super().__init__()
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
                               BlockManager(NUM_BLOCKS, BLOCK_SIZE))
        self.seqs: dict[int, Sequence] = {}
        self.next_id = 0

    @rule(prefix=st.sampled_from([[], *SHARED]), tail=st.lists(st.integers(0, 5), min_size=1,
                                                                max_size=20),
          max_tokens=st.integers(1, 12))
    def add(self, prefix: list[int], tail: list[int], max_tokens: int) -> None:
        seq = Sequence(self.next_id, prefix + tail, SamplingParams(max_tokens=max_tokens))
        self.next_id += 1
        self.sched.add(seq)
        self.seqs[seq.seq_id] = seq

    @rule(token=st.integers(0, 5))
    def step(self, token: int) -> None:
        """One step: schedule, 'run' it (sample for every sequence that reached its end)."""
        batch = self.sched.step()
        for entry in batch.entries:
            seq = entry.seq
            assert seq.status is SequenceStatus.RUNNING
            # The table covers every token this step computes.
            assert len(seq.block_table) * BLOCK_SIZE >= entry.start + entry.num_tokens
        sampling = [e.seq for e in batch.entries if e.samples]
        self.sched.on_step_done(batch)
        for seq in sampling:
            seq.output_token_ids.append(token)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                self.sched.finish(seq, "length")
                del self.seqs[seq.seq_id]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        assert self.sched.abort(seq_id) is self.seqs.pop(seq_id)
        assert self.sched.abort(seq_id) is None  # a second abort frees nothing

    @invariant()
    def no_block_leaked_or_double_freed(self) -> None:
        live = [*self.sched.running, *self.sched.waiting]
        assert {s.seq_id for s in live} == set(self.seqs)
        check_pool(self.sched.blocks, [s.block_table for s in live])
        for s in self.sched.waiting:
            assert s.block_table == []  # waiting sequences hold no blocks

    def teardown(self) -> None:
        for seq_id in list(self.seqs):
            self.sched.abort(seq_id)
        bm = self.sched.blocks
        assert bm.num_free_blocks == NUM_BLOCKS and not any(bm.ref_counts)
        assert self.sched.num_unfinished == 0


SchedulerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=50,
                                              deadline=None)
TestScheduler = SchedulerMachine.TestCase
