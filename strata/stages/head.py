"""The head stage's core: the engine's scheduler and output side, with the model run remotely.

`HeadCore` is an `EngineCore` whose step is split in two: `schedule` + `launch` run the
head's own layers (embedding and the first layer range) and produce a STEP frame for
the next stage; `complete` takes the tail's sampled tokens and does exactly what
`EngineCore.step` does after sampling (append, detokenize, stop checks, prefix-cache
commits). Several micro-batches can be in flight: the scheduler knows which sequences are
still in the pipeline (`Scheduler.step_pipelined` / `landed`; their next token is unknown),
so the next micro-batch is built from the others, as vLLM's pipeline-parallel virtual
engines do.

The head's block manager is the one block namespace of the pipeline: every replica of
every downstream stage sizes its KV tensors like the head's, so the head's block tables
address them all. With replicated stages a cached block's KV exists only on the path
that computed it, so prefix-cache hits are limited to blocks written by the same path.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from strata.engine.core import EngineCore, SeqOutput
from strata.engine.kv_cache import BlockManager
from strata.engine.prefix_registry import RouteKeys
from strata.engine.runner import ModelRunner
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import Batch, Scheduler, SchedulerConfig
from strata.engine.sequence import Sequence, SequenceStatus
from strata.engine.tokenizer import Tokenizer
from strata.load import LoadReport
from strata.protocol import OpenAIError
from strata.stages.protocol import NewSeq, StepResult, step_message
from strata.stages.replicas import NoReplicaError, Path, ReplicaSets, ReplicaView
from strata.stages.transport import Frame


class StageUnavailable(OpenAIError):
    """A stage failed or has no replica: the client gets a 503 in OpenAI's error format."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 503, "ServiceUnavailable")


class PathBlockManager(BlockManager):
    """A BlockManager that remembers which pipeline path wrote each block.

    Prefix-cache hits are trimmed at the first block another path wrote: that block's
    KV lives on other replicas of the downstream stages.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
        path_of: Callable[[int], Path | None], sliding_window: int | None = None,
    ) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching, sliding_window)
        self.path_of = path_of
        self.owner: list[Path | None] = [None] * num_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table and record the sequence's path as the new blocks' writer."""
        before = len(seq.block_table)
        if not super().allocate(seq, num_tokens):
            return False
        path = self.path_of(seq.seq_id)
        for b in seq.block_table[before:]:
            self.owner[b] = path
        return True

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks, but only the leading ones this sequence's path wrote."""
        cached = super().match_prefix(seq)
        path = self.path_of(seq.seq_id)
        keep = 0
        for b in seq.block_table:
            if self.owner[b] != path:
                break
            keep += 1
        if keep == len(seq.block_table):
            return cached
        for b in reversed(seq.block_table[keep:]):
            self.release(b)
        del seq.block_table[keep:]
        del seq.block_hashes[keep:]
        seq.num_hashed_blocks = keep
        now_cached = min(keep * self.block_size, seq.num_tokens - 1)
        self.hit_tokens -= cached - now_cached
        seq.num_cached_tokens = seq.num_computed_tokens = now_cached
        return now_cached


@dataclass
class InFlight:
    """A micro-batch sent down the pipeline and not answered yet."""

    batch: Batch
    path: Path
    plp_ranges: dict[int, tuple[int, int]]
    started: float
    sent_bytes: int = 0


class HeadCore(EngineCore):
    """Scheduler, embedding, the first layers and the output side of a stage pipeline."""

    supports_guided = False  # its tail samples; grammars are not carried to it

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        scheduler_config: SchedulerConfig,
        model_name: str,
        enable_prefix_caching: bool,
        downstream: list[tuple[int, int]],
        max_inflight: int = 2,
        step_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(runner, tokenizer, scheduler_config, model_name, enable_prefix_caching)
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.stage_name = f"{runner.model.layer_start}:{runner.model.layer_end}"
        self.lock = threading.Lock()  # guards `replicas` against the HTTP and network threads
        self.replicas = ReplicaSets(downstream, runner.num_blocks)
        # The head's block ids address every stage's cache, so blocks it gives back
        # before a sliding window (all layers', from the whole model's config) are
        # free on every stage at once.
        self.blocks = PathBlockManager(
            runner.num_blocks, runner.block_size, enable_prefix_caching, self.replicas.path_of,
            sliding_window=runner.model.config.kv_window,
        )
        self.scheduler = Scheduler(scheduler_config, self.blocks)
        self.prefixes = None  # its steps do not follow the prefix cache for gateways (yet)
        self.max_inflight = max_inflight
        self.step_timeout_s = step_timeout_s
        self.inflight: dict[int, InFlight] = {}
        self.deferred_aborts: set[int] = set()
        self.announced: set[int] = set()  # sequences whose tail has their sampling state
        self.drops: dict[str, list[int]] = {}  # replica -> finished sequences to forget
        self._step_ids = itertools.count(1)
        # Per-step timing for /stages: head compute, round trip, stage compute, bytes.
        self.timing: deque[tuple[float, float, float, int, int]] = deque(maxlen=256)
        self.timing_totals = dict.fromkeys(
            ("steps", "head_compute_s", "round_trip_s", "stages_compute_s", "sent_bytes", "tokens"),
            0.0,
        )

    # -- requests ---------------------------------------------------------------
    def add(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, now: float,
            route_keys: RouteKeys = ()) -> None:
        """Queue a sequence and pin it to one replica of every downstream stage.

        ``route_keys`` are ignored: the head publishes no prefix registry (yet).
        """
        super().add(seq_id, prompt_ids, params, now)
        try:
            with self.lock:
                self.replicas.pin(seq_id, self.used_blocks())
        except NoReplicaError as e:
            self.scheduler.abort(seq_id)
            self.states.pop(seq_id, None)
            raise StageUnavailable(str(e)) from e

    def abort(self, seq_id: int) -> bool:
        """Drop a sequence; one inside an in-flight micro-batch is dropped when it returns."""
        if seq_id in self.scheduler.in_flight:
            self.states.pop(seq_id, None)
            self.deferred_aborts.add(seq_id)
            return True
        found = super().abort(seq_id)
        self._release(seq_id)
        return found

    def _release(self, seq_id: int) -> None:
        with self.lock:
            path = self.replicas.unpin(seq_id)
        self.announced.discard(seq_id)
        for addr in path or ():
            self.drops.setdefault(addr, []).append(seq_id)

    def used_blocks(self) -> dict[str, int]:
        """KV blocks the sequences pinned to each replica hold or will hold for their tokens so far.

        Call under the lock. A waiting sequence counts its prompt, so a burst of new
        sequences spreads over the replicas before any of them is admitted.
        """
        out: dict[str, int] = {}
        bs = self.runner.block_size
        for seq in itertools.chain(self.scheduler.running, self.scheduler.waiting):
            blocks = max(len(seq.block_table), -(-seq.num_tokens // bs))
            for addr in self.replicas.path_of(seq.seq_id) or ():
                out[addr] = out.get(addr, 0) + blocks
        return out

    def pipeline_ready(self) -> bool:
        """Every downstream stage has a live replica."""
        with self.lock:
            return self.replicas.ready()

    def replica_views(self) -> list[ReplicaView]:
        """Snapshot of the replica sets for /stages."""
        with self.lock:
            return self.replicas.views(self.used_blocks())

    # -- scheduling -------------------------------------------------------------
    def schedulable_paths(self) -> list[Path]:
        """Paths with a sequence that is not in flight, whose in-flight count allows a step."""
        per_path: dict[Path, int] = {}
        for inf in self.inflight.values():
            per_path[inf.path] = per_path.get(inf.path, 0) + 1
        paths: dict[Path, None] = {}
        in_flight = self.scheduler.in_flight
        for seq in itertools.chain(self.scheduler.running, self.scheduler.waiting):
            if seq.seq_id in in_flight:
                continue
            path = self.replicas.path_of(seq.seq_id)
            if path is not None and per_path.get(path, 0) < self.max_inflight:
                paths[path] = None
        return sorted(paths, key=lambda p: per_path.get(p, 0))

    def schedule(self, path: Path) -> Batch:
        """The next micro-batch of `path`'s sequences that are not in flight."""
        sched = self.scheduler
        path_of = self.replicas.path_of

        def on_path(s: Sequence) -> bool:
            return path_of(s.seq_id) == path

        # Share the path's sequences among max_inflight micro-batches so that several
        # are in the pipeline at once (one per stage keeps every stage busy).
        n = sum(1 for s in itertools.chain(sched.running, sched.waiting) if on_path(s))
        batch = sched.step_pipelined(on_path, max(1, -(-n // self.max_inflight)))
        for seq in batch.preempted:
            st = self.states.get(seq.seq_id)
            if st is not None:
                st.pending_logprobs.clear()
        return batch

    def launch(self, batch: Batch, path: Path) -> tuple[int, str, Frame]:
        """Run the head's layers on a scheduled batch; returns (step id, first hop, frame)."""
        t0 = time.perf_counter()
        inputs = self.runner.prepare(batch)
        hidden = self.runner.forward(inputs)
        plp_ranges = self._prompt_logprob_rows(batch, len(batch.decodes))
        extra = [r for rng in plp_ranges.values() for r in range(*rng)]
        msg = step_message(batch, inputs, hidden.cpu(), self.runner.block_size, extra)
        msg.hops = list(path[1:])
        for e in batch.entries:
            sid = e.seq.seq_id
            if sid not in self.announced:
                msg.new_seqs[sid] = NewSeq(e.seq.params, e.seq.prompt_token_ids,
                                           list(e.seq.output_token_ids))
                self.announced.add(sid)
        with self.lock:
            used = self.used_blocks()
            for addr in path:
                self.replicas.replicas[addr].inflight += 1
        msg.kv_free = {addr: self.runner.num_blocks - used.get(addr, 0) for addr in path}
        msg.stage_s = {self.stage_name: time.perf_counter() - t0}
        step_id = next(self._step_ids)
        frame = msg.to_frame(step_id)
        self.inflight[step_id] = InFlight(batch, path, plp_ranges, t0, frame.nbytes)
        return step_id, path[0], frame

    # -- results ----------------------------------------------------------------
    def _retire(self, step_id: int) -> InFlight | None:
        inf = self.inflight.pop(step_id, None)
        if inf is None:
            return None
        self.scheduler.landed(inf.batch)
        with self.lock:
            for addr in inf.path:
                rep = self.replicas.replicas.get(addr)
                if rep is not None:
                    rep.inflight -= 1
                    rep.steps += 1
        return inf

    def complete(self, step_id: int, result: StepResult) -> list[SeqOutput]:
        """Apply the tail's tokens to a returned micro-batch (EngineCore.step's second half)."""
        inf = self._retire(step_id)
        if inf is None:
            return []  # answered after it was failed (timeout, lost replica)
        batch = inf.batch
        sample_entries = [e for e in batch.entries if e.samples]
        if len(result.tokens) != len(sample_entries):
            raise RuntimeError(
                f"step {step_id}: the tail sampled {len(result.tokens)} tokens for "
                f"{len(sample_entries)} sequences"
            )
        failed: dict[int, BaseException] = {}
        if inf.plp_ranges and result.prompt_logits is not None:
            self._collect_prompt_logprobs(batch, inf.plp_ranges, result.prompt_logits, failed)
        self.scheduler.on_step_done(batch)
        # after _retire: a failed sequence is not in flight, so its blocks go at once
        outputs = self._append_sampled(sample_entries, result.tokens, result.logprobs, failed)
        for out in outputs:
            if out.finished:
                self._release(out.seq_id)
        round_trip = time.perf_counter() - inf.started
        self._account(batch, len(sample_entries), round_trip)
        stage_total = sum(result.stage_s.values())
        head_s = result.stage_s.get(self.stage_name, 0.0)
        self.timing.append((head_s, round_trip, stage_total, inf.sent_bytes, batch.num_tokens))
        for key, v in (("steps", 1.0), ("head_compute_s", head_s), ("round_trip_s", round_trip),
                       ("stages_compute_s", stage_total), ("sent_bytes", float(inf.sent_bytes)),
                       ("tokens", float(batch.num_tokens))):
            self.timing_totals[key] += v
        for e in batch.entries:
            sid = e.seq.seq_id
            if sid in self.deferred_aborts:
                self.deferred_aborts.discard(sid)
                super().abort(sid)
                self._release(sid)
        return outputs

    def fail_step(self, step_id: int, reason: str) -> list[tuple[int, BaseException]]:
        """Fail every sequence of a micro-batch (its stage errored, died or timed out)."""
        inf = self._retire(step_id)
        if inf is None:
            return []
        errors: list[tuple[int, BaseException]] = []
        for e in inf.batch.entries:
            sid = e.seq.seq_id
            if self.states.pop(sid, None) is not None:
                errors.append((sid, StageUnavailable(reason)))
            self.deferred_aborts.discard(sid)
            super().abort(sid)
            self._release(sid)
        return errors

    def fail_replica(self, addr: str, reason: str) -> list[tuple[int, BaseException]]:
        """A replica is gone: fail what it holds; unstarted sequences move to another replica."""
        errors: list[tuple[int, BaseException]] = []
        with self.lock:
            rep = self.replicas.set_state(addr, "down")
        if rep is None:
            return errors
        for step_id, inf in list(self.inflight.items()):
            if addr in inf.path:
                errors += self.fail_step(step_id, reason)
        for sid in sorted(rep.pinned):
            seq = self.scheduler.get(sid)
            fresh = (
                seq is not None and seq.status is SequenceStatus.WAITING and not seq.block_table
                and sid not in self.announced
            )
            if fresh:
                with self.lock:
                    self.replicas.unpin(sid)
                    try:
                        self.replicas.pin(sid, self.used_blocks())
                        continue
                    except NoReplicaError:
                        pass
            if self.states.pop(sid, None) is not None:
                errors.append((sid, StageUnavailable(reason)))
            super().abort(sid)
            self._release(sid)
        with self.lock:
            self.replicas.remove_if_drained(addr)
        return errors

    def expired_steps(self, now: float) -> list[int]:
        """Micro-batches in flight for longer than step_timeout_s."""
        return [s for s, inf in self.inflight.items() if now - inf.started > self.step_timeout_s]

    def take_drops(self) -> dict[str, list[int]]:
        """Finished sequences each replica may forget, since the last call."""
        drops, self.drops = self.drops, {}
        return drops

    def load_report(self, ready: bool = True) -> LoadReport:
        """The head's load report, labelled with its layer range."""
        return dataclasses.replace(super().load_report(ready), stage=self.stage_name)

    def timing_summary(self) -> dict[str, float]:
        """Mean per-step head compute, round trip, all-stage compute and bytes (recent steps)."""
        if not self.timing:
            return {}
        n = len(self.timing)
        head = sum(t[0] for t in self.timing) / n
        rtt = sum(t[1] for t in self.timing) / n
        compute = sum(t[2] for t in self.timing) / n
        return {
            "steps": float(n),
            "head_compute_s": head,
            "round_trip_s": rtt,
            "stages_compute_s": compute,
            "transport_and_wait_s": max(0.0, rtt - compute),
            "sent_bytes": sum(t[3] for t in self.timing) / n,
            "tokens": sum(t[4] for t in self.timing) / n,
        }

