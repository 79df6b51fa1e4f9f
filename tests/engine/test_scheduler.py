"""Scheduler: token budget, chunked prefill, admission limits, preemption."""

from __future__ import annotations

import random

import pytest

from strata.engine.kv_cache import BlockManager
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import Batch, ScheduledSeq, Scheduler, SchedulerConfig
from strata.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size))


def add(s: Scheduler, i: int, n: int, max_tokens: int = 8) -> Sequence:
    seq = Sequence(i, list(range(1000 * i, 1000 * i + n)), SamplingParams(max_tokens=max_tokens))
    s.add(seq)
    return seq


def run_step(s: Scheduler):
    batch = s.step()
    sampling = [e for e in batch.entries if e.samples]
    s.on_step_done(batch)
    for e in sampling:
        e.seq.output_token_ids.append(7)
    batch.sampled = sampling
    return batch


def test_chunked_prefill_respects_token_budget() -> None:
    s = make(max_num_batched_tokens=10)
    a = add(s, 1, 25)
    b1 = run_step(s)
    assert [(e.start, e.num_tokens) for e in b1.prefills] == [(0, 10)]
    assert not b1.sampled
    b2 = run_step(s)
    b3 = run_step(s)
    assert [(e.start, e.num_tokens) for e in b3.prefills] == [(20, 5)]
    assert b3.sampled == b3.prefills and a.output_token_ids == [7]
    b4 = run_step(s)
    assert len(b4.decodes) == 1 and b4.decodes[0].start == 25
    assert b2.num_tokens == 10


def test_decodes_come_first_and_new_prefills_fill_the_budget() -> None:
    s = make(max_num_batched_tokens=8)
    add(s, 1, 3)
    run_step(s)
    add(s, 2, 20)
    b = run_step(s)
    assert len(b.decodes) == 1
    assert b.prefills[0].num_tokens == 7  # 8 - one decode


def test_max_num_seqs_limits_running() -> None:
    s = make(max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(4):
        add(s, i + 1, 4)
    b = run_step(s)
    assert len(b.prefills) == 2 and len(s.waiting) == 2


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    s = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a = add(s, 1, 7, max_tokens=20)
    b = add(s, 2, 7, max_tokens=20)
    run_step(s)  # both admitted: 2 blocks each
    assert len(s.running) == 2
    preempted = []
    for _ in range(4):
        batch = run_step(s)
        preempted += batch.preempted
    assert b in preempted and b.status is SequenceStatus.WAITING
    assert b.num_computed_tokens == 0 and b.block_table == []
    assert a.status is SequenceStatus.RUNNING
    # Output tokens survive preemption and are recomputed later.
    assert len(b.output_token_ids) >= 1


def test_abort_frees_blocks_everywhere() -> None:
    s = make(num_blocks=16)
    a = add(s, 1, 9)
    b = add(s, 2, 9)
    run_step(s)
    c = add(s, 3, 9)
    for seq in (a, b, c):
        s.abort(seq.seq_id)
    assert s.blocks.num_free_blocks == 16
    assert not s.running and not s.waiting


def test_prefix_cache_hit_skips_computed_tokens() -> None:
    s = make(num_blocks=32, block_size=4, max_num_batched_tokens=64)
    a = add(s, 1, 12)
    run_step(s)
    s.finish(a, "stop")
    again = Sequence(9, list(a.prompt_token_ids) + [5, 6], SamplingParams())
    s.add(again)
    b = run_step(s)
    assert b.prefills[0].start == 12 and b.prefills[0].num_tokens == 2



class _ReferenceScheduler(Scheduler):
    """step() as first written (an allocate call per running sequence), for comparison."""

    def step(self) -> Batch:
        batch = Batch()
        budget = self.config.max_num_batched_tokens
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            start = seq.num_computed_tokens
            left = seq.num_uncomputed_tokens
            n = min(left, budget)
            while not self.blocks.allocate(seq, start + n):
                victim = running[-1]
                if victim is seq:
                    break
                self._preempt(victim, batch)
            else:
                entry = ScheduledSeq(seq, start, n)
                (batch.decodes if n == 1 and left <= 1 else batch.prefills).append(entry)
                budget -= n
                i += 1
                continue
            self._preempt(seq, batch)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            matched = not seq.block_table
            if matched:
                self.blocks.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            start = seq.num_computed_tokens
            if not self.blocks.allocate(seq, start + n):
                fits = False
                if not self.running and not batch:
                    free_tokens = (
                        len(seq.block_table) + self.blocks.num_free_blocks
                    ) * self.blocks.block_size - start
                    n = min(n, free_tokens)
                    fits = n > 0 and self.blocks.allocate(seq, start + n)
                if not fits:
                    if matched:
                        self.blocks.unmatch(seq)
                    break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            entry = ScheduledSeq(seq, start, n)
            (batch.decodes if n == 1 and not seq.is_prefill else batch.prefills).append(entry)
            budget -= n
        return batch

    def on_step_done(self, batch: Batch) -> None:
        for entry in batch.entries:
            entry.seq.num_computed_tokens = entry.start + entry.num_tokens
            self.blocks.commit(entry.seq)


def _shape(batch: Batch) -> tuple:
    return ([(e.seq.seq_id, e.start, e.num_tokens) for e in batch.decodes],
            [(e.seq.seq_id, e.start, e.num_tokens) for e in batch.prefills],
            [s.seq_id for s in batch.preempted])


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_step_matches_the_straightforward_loop_under_preemption(caching: bool,
                                                                seed: int) -> None:
    """Skipping allocate calls that would be no-ops leaves every batch as it was."""
    rng = random.Random(seed)
    cfg = SchedulerConfig(max_num_seqs=rng.choice((4, 8, 16)),
                          max_num_batched_tokens=rng.choice((8, 32, 64)))
    num_blocks = rng.choice((12, 24, 40))
    pair = [cls(cfg, BlockManager(num_blocks, 4, caching))
            for cls in (Scheduler, _ReferenceScheduler)]
    seqs: list[list[Sequence]] = [[], []]
    preempted = 0
    for step in range(400):
        if rng.random() < 0.3:
            n, max_tokens = rng.randrange(1, 40), rng.randrange(1, 30)
            prompt = [rng.randrange(3) for _ in range(n)]
            for side, s in enumerate(pair):
                seq = Sequence(step, list(prompt), SamplingParams(max_tokens=max_tokens))
                s.add(seq)
                seqs[side].append(seq)
        batches = [s.step() for s in pair]
        assert _shape(batches[0]) == _shape(batches[1])
        preempted += len(batches[0].preempted)
        for s, batch in zip(pair, batches, strict=True):
            sampling = [e for e in batch.entries if e.samples]
            s.on_step_done(batch)
            for e in sampling:
                e.seq.output_token_ids.append(step % 3)
                if len(e.seq.output_token_ids) >= e.seq.params.max_tokens:
                    s.finish(e.seq, "length")
        assert [q.block_table for q in seqs[0]] == [q.block_table for q in seqs[1]]
        assert [q.num_computed_tokens for q in seqs[0]] == \
            [q.num_computed_tokens for q in seqs[1]]
    assert preempted > 0  # the pool is small enough to exercise the preemption loop


# -- pipelined engines: batches in flight ------------------------------------------------


def land(s: Scheduler, batch: Batch) -> None:
    """The batch came back: advance it, sample, finish what reached max_tokens."""
    sampled = [e.seq for e in batch.entries if e.samples]
    s.landed(batch)
    s.on_step_done(batch)
    for seq in sampled:
        seq.output_token_ids.append(7)
        if len(seq.output_token_ids) >= seq.params.max_tokens:
            s.finish(seq, "length")


def test_sequences_in_flight_are_left_out_until_their_batch_lands() -> None:
    s = make(max_num_batched_tokens=64)
    seqs = [add(s, i, 5) for i in range(4)]
    first = s.step_pipelined(lambda q: True, max_batch_seqs=2)
    assert [e.seq for e in first.entries] == seqs[:2]
    assert s.in_flight == {0, 1}
    second = s.step_pipelined(lambda q: True, max_batch_seqs=2)
    assert [e.seq for e in second.entries] == seqs[2:]
    assert not s.step_pipelined(lambda q: True, max_batch_seqs=2)  # all four in flight
    land(s, first)
    assert s.in_flight == {2, 3}
    third = s.step_pipelined(lambda q: True, max_batch_seqs=2)
    assert [(e.seq, e.num_tokens) for e in third.decodes] == [(seqs[0], 1), (seqs[1], 1)]
    assert s.get(3) is seqs[3] and s.get(99) is None


def test_a_pipelined_step_schedules_only_eligible_sequences_and_keeps_the_others() -> None:
    s = make(max_num_batched_tokens=64, max_num_seqs=3)
    seqs = [add(s, i, 5) for i in range(5)]
    even = s.step_pipelined(lambda q: q.seq_id % 2 == 0, max_batch_seqs=8)
    # three slots in all: the even ones take them; the odd ones wait where they were
    assert [e.seq.seq_id for e in even.entries] == [0, 2, 4]
    assert [q.seq_id for q in s.waiting] == [1, 3]
    assert s.running == [seqs[0], seqs[2], seqs[4]]
    # no slot left for the odd ones while the even ones run
    assert not s.step_pipelined(lambda q: q.seq_id % 2 == 1, max_batch_seqs=8)
    assert [q.seq_id for q in s.waiting] == [1, 3]


def test_a_pipelined_step_never_preempts_a_sequence_in_flight() -> None:
    s = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a, b = add(s, 1, 8), add(s, 2, 8)  # two blocks each: the cache is full
    first = s.step_pipelined(lambda q: q is a, max_batch_seqs=1)
    second = s.step_pipelined(lambda q: q is b, max_batch_seqs=1)
    assert [e.seq for e in first.entries] == [a] and [e.seq for e in second.entries] == [b]
    land(s, first)
    # a needs a third block for its decode: the only victim would be b, in flight
    third = s.step_pipelined(lambda q: True, max_batch_seqs=2)
    assert b.status is SequenceStatus.RUNNING and b.block_table
    assert third.preempted == [a] and not third.entries


def test_a_pipelined_step_with_nothing_in_flight_is_a_plain_step() -> None:
    plain, piped = make(num_blocks=24), make(num_blocks=24)
    for s in (plain, piped):
        for i in range(10):
            add(s, i, 3 + (7 * i) % 11, max_tokens=2 + i % 5)
    for _ in range(100):
        a = plain.step()
        b = piped.step_pipelined(lambda q: True, max_batch_seqs=64)
        assert _shape(a) == _shape(b)
        land(plain, a)
        land(piped, b)
    assert not piped.in_flight and not piped.num_unfinished
