"""Scheduler: token budget, chunked prefill, admission limits, preemption."""

from __future__ import annotations

from strata.engine.kv_cache import BlockManager
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import Scheduler, SchedulerConfig
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
