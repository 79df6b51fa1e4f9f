"""Iteration-level continuous batching with chunked prefill.

Pure: `step()` turns queue state into the next batch; no clock, I/O or torch, so
the discrete-event simulator drives this very class. Each step first continues
the running sequences (decodes and unfinished prefill chunks), then admits
waiting ones, all under one token budget. When KV blocks run out the newest
running sequence is preempted and later recomputed (its prefix is often still
cached).

A pipelined engine (the stage head) keeps several batches in flight at once: it builds
each with `step_pipelined`, which leaves out the sequences of batches not yet landed
(`in_flight`, cleared by `landed`), as vLLM v1's scheduler skips requests still in its
batch queue. A plain engine uses `step` and never has a sequence in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from strata.engine.kv_cache import BlockManager
from strata.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits."""

    max_num_seqs: int = 64
    # Token budget of one step (chunked-prefill size). vLLM's CPU server default: a burst of
    # prompts is admitted in a few large steps instead of many small ones, each of which
    # pays the step's fixed cost (weights streamed, decodes run) again.
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")


@dataclass(slots=True)
class ScheduledSeq:
    """A sequence's share of one step: tokens [start, start + num_tokens)."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's end, so a token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class Batch:
    """The work of one engine step; decodes first, then prefill chunks."""

    decodes: list[ScheduledSeq] = field(default_factory=list)
    prefills: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def entries(self) -> list[ScheduledSeq]:
        """All scheduled sequences in batch order."""
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        """Tokens the model runs this step."""
        return len(self.decodes) + sum(e.num_tokens for e in self.prefills)

    @property
    def num_prefill_tokens(self) -> int:
        """Prompt (or recomputed) tokens in this step."""
        return sum(e.num_tokens for e in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    """Owns the waiting and running queues and the block manager."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._by_id: dict[int, Sequence] = {}
        # Sequences inside a batch whose step has not come back (pipelined engines only):
        # their next token is unknown, so no batch may schedule them until they land.
        self.in_flight: set[int] = set()

    # -- queue changes --------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (FCFS)."""
        if seq.num_prompt_tokens == 0:
            raise ValueError("a sequence needs at least one prompt token")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._by_id[seq.seq_id] = seq

    def abort(self, seq_id: int) -> Sequence | None:
        """Remove a sequence wherever it is and free its blocks."""
        seq = self._by_id.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a running sequence that met a stop condition."""
        seq.finish_reason = reason
        self.running.remove(seq)
        self._by_id.pop(seq.seq_id, None)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED

    def get(self, seq_id: int) -> Sequence | None:
        """The unfinished sequence with this id, if any."""
        return self._by_id.get(seq_id)

    @property
    def num_unfinished(self) -> int:
        """Sequences waiting or running."""
        return len(self.waiting) + len(self.running)

    def waiting_prompt_tokens(self) -> int:
        """Tokens still to prefill across waiting and partially prefilled sequences."""
        total = sum(s.num_uncomputed_tokens for s in self.waiting)
        total += sum(s.num_uncomputed_tokens - 1 for s in self.running if s.is_prefill)
        return total

    # -- the policy -------------------------------------------------------------
    def _preempt(self, seq: Sequence, batch: Batch) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def step(self, max_num_seqs: int | None = None) -> Batch:
        """Choose the next batch; mutates block tables and queue membership.

        ``max_num_seqs`` lowers the running limit for this step (default: the config's).
        """
        limit = self.config.max_num_seqs if max_num_seqs is None else max_num_seqs
        batch = Batch()
        budget = self.config.max_num_batched_tokens
        # 1. Running sequences, oldest first; preempt the newest when blocks run out.
        running = self.running
        allocate = self.blocks.allocate
        block_size = self.blocks.block_size
        decodes, prefills = batch.decodes, batch.prefills
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            start = seq.num_computed_tokens
            left = len(seq.prompt_token_ids) + len(seq.output_token_ids) - start  # uncomputed
            n = left if left < budget else budget
            end = start + n
            # allocate() is a no-op while the table covers `end` tokens: most decodes.
            if end > len(seq.block_table) * block_size and not allocate(seq, end):
                victim = running[-1]
                while victim is not seq:
                    self._preempt(victim, batch)
                    if allocate(seq, end):
                        break
                    victim = running[-1]
                else:
                    # Could not fit even alone: preempt this one too.
                    self._preempt(seq, batch)
                    continue
            # A decode: one token left, not a prefill's last chunk (is_prefill: left > 1).
            (decodes if n == 1 and left <= 1 else prefills).append(ScheduledSeq(seq, start, n))
            budget -= n
            i += 1
        # 2. Admit waiting sequences while budget, slots and blocks allow.
        while self.waiting and budget > 0 and len(self.running) < limit:
            seq = self.waiting[0]
            matched = not seq.block_table
            if matched:
                self.blocks.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            start = seq.num_computed_tokens
            if not self.blocks.allocate(seq, start + n):
                fits = False
                if not self.running and not batch:
                    # Nothing else holds blocks: a smaller chunk may still fit.
                    free_tokens = (
                        len(seq.block_table) + self.blocks.num_free_blocks
                    ) * self.blocks.block_size - start
                    n = min(n, free_tokens)
                    fits = n > 0 and self.blocks.allocate(seq, start + n)
                if not fits:
                    if matched:
                        self.blocks.unmatch(seq)  # hold no blocks while waiting
                    break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            entry = ScheduledSeq(seq, start, n)
            (batch.decodes if n == 1 and not seq.is_prefill else batch.prefills).append(entry)
            budget -= n
        return batch

    def step_pipelined(self, eligible: Callable[[Sequence], bool], max_batch_seqs: int) -> Batch:
        """One more batch while others are in flight: only sequences not in flight for which
        ``eligible`` holds take part, at most ``max_batch_seqs`` of them (running ones
        first), and admissions keep every running sequence within ``max_num_seqs``.

        The batch's sequences are in flight until `landed`. The others stay where they
        were, ahead of this batch's in the running list and behind them in the queue.
        """
        in_flight = self.in_flight

        def takes_part(s: Sequence) -> bool:
            return s.seq_id not in in_flight and eligible(s)

        running, waiting = self.running, self.waiting
        shown = [s for s in running if takes_part(s)]
        held_running = [s for s in running if not takes_part(s)] + shown[max_batch_seqs:]
        held_waiting = [s for s in waiting if not takes_part(s)]
        shown_waiting = deque(s for s in waiting if takes_part(s))
        slots = min(self.config.max_num_seqs - len(held_running), max_batch_seqs)
        if slots < 1:  # no room to admit anyone: hold the waiting ones too
            held_waiting = [*shown_waiting, *held_waiting]
            shown_waiting = deque()
        self.running, self.waiting = shown[:max_batch_seqs], shown_waiting
        try:
            batch = self.step(max(1, slots))
        finally:
            self.running = held_running + self.running
            self.waiting = deque([*self.waiting, *held_waiting])
        in_flight.update(e.seq.seq_id for e in batch.entries)
        return batch

    def landed(self, batch: Batch) -> None:
        """A pipelined batch came back (or failed): its sequences may be scheduled again."""
        self.in_flight.difference_update(e.seq.seq_id for e in batch.entries)

    def on_step_done(self, batch: Batch) -> None:
        """Advance computed-token counts, publish new full blocks to the prefix cache and
        give back blocks that fell out of a sliding window."""
        commit = self.blocks.commit
        window = self.blocks.sliding_window is not None
        for group in (batch.decodes, batch.prefills):
            for entry in group:
                seq = entry.seq
                seq.num_computed_tokens = entry.start + entry.num_tokens
                commit(seq)
                if window:
                    self.blocks.release_before_window(seq)
