"""A simulated engine replica: strata's real scheduler and block manager, timed by a cost model.

Each replica owns a real ``strata.engine.scheduler.Scheduler`` and
``strata.engine.kv_cache.BlockManager`` and loops as ``EngineCore`` does: ``step()``,
"run" the batch for the cost model's iteration time, ``on_step_done``, append one token to
every sequence that samples, finish those that reached ``max_tokens``, repeat. Arrivals
join the waiting queue between steps, as the engine thread picks up new requests.

**Skipping decode runs.** Most iterations of a busy replica are pure decode steps whose
outcome is known in advance: the same sequences each gain one token. After a real step
that (a) scheduled every running sequence as a decode, (b) admitted, preempted and finished
nothing and (c) saw no arrival, every following step is the same until a sequence reaches
its ``max_tokens``, the KV cache runs out of free blocks, or a request arrives. The replica
then advances those ``k`` steps in closed form: the cost model gives step ``i`` as
``a + b i`` (``decode_piece``), the sequences get their tokens, blocks and prefix-cache
commits exactly as ``k`` calls of ``step``/``on_step_done`` would give them, and the next
change (a finish, an arrival cutting the run short at the end of the step in progress, a
load report) is handled by the real scheduler again. ``fast_forward=False`` turns this
off; tests check that both give identical results.

The load report is ``EngineCore.load_report``'s, measured by the same ``LoadMeter``
(``strata.load_meter``): a skipped run is recorded there in closed form.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from strata.engine.kv_cache import BlockManager
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import Batch, Scheduler, SchedulerConfig
from strata.engine.sequence import Sequence
from strata.load import LoadReport
from strata.load_meter import LoadMeter
from strata.sim.decode_run import DecodeRun
from strata.sim.events import EventLoop
from strata.sim.frozen import positional_constructor
from strata.sim.perf_model import PipelineCost, ReplicaModel, StepFeatures
from strata.sim.types import EngineSettings, ReplicaListener, SimRequest

_ZEROS = [0] * 4096  # sampled token ids: their values never matter to the scheduler
_new_load_report = positional_constructor(  # a report per gateway poll
    LoadReport, "model running waiting waiting_prompt_tokens free_kv_blocks total_kv_blocks "
    "block_size max_num_seqs max_num_batched_tokens prefix_hit_rate prompt_tokens_per_s "
    "generation_tokens_per_s decode_step_s prefill_token_s ready draining stage "
    "slot_free_tokens lora_adapters")


class SimReplicaPhase(enum.Enum):
    """Life of a replica: provisioned, serving, on its way out, gone."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class SimReplica:
    """One engine replica (or one virtual engine of a stage pipeline) in virtual time."""

    def __init__(
        self,
        replica_id: str,
        spec: ReplicaModel,
        engine: EngineSettings,
        loop: EventLoop,
        listener: ReplicaListener,
        prompt_ids: Callable[[SimRequest], list[int]],
        *,
        created_at: float,
        unit: str = "",
        fast_forward: bool = True,
    ) -> None:
        self.replica_id = replica_id
        self.unit = unit or replica_id  # the scaled unit (a pipeline groups virtual engines)
        self.spec = spec
        self.engine = engine
        self.loop = loop
        self.listener = listener
        self.prompt_ids = prompt_ids
        self.fast_forward = fast_forward
        self.blocks = BlockManager(engine.num_blocks, engine.block_size, engine.prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(engine.max_num_seqs, engine.max_num_batched_tokens,
                            engine.max_model_len), self.blocks)
        self.state = SimReplicaPhase.STARTING
        self.created_at = created_at
        self.ready_at: float | None = None
        self.stopped_at: float | None = None
        self.requests: dict[int, SimRequest] = {}
        # engine loop state
        self._version = 0
        self._busy = False
        self._batch: Batch | None = None
        self._waiting_after_step = 0
        self._step_dt = 0.0
        self._step_f = StepFeatures()
        self._run: DecodeRun | None = None
        # Scheduler.waiting_prompt_tokens() in two parts: the waiting sequences' tokens, kept
        # up to date (summing a long backlog at every report would cost O(backlog)), and
        # the running prefills' rest, cached until the next real step.
        self._waiting_sum = 0
        self._running_prefill: int | None = None
        # measurements (EngineCore's, plus the simulator's own accounting)
        self.meter = LoadMeter(created_at)
        self.busy_s = 0.0  # wall seconds with a step in progress (completed steps)
        self.busy_gpu_s = 0.0
        self.steps = 0  # iterations, real or skipped
        self.real_steps = 0  # scheduler.step() calls
        self._is_pipeline = isinstance(spec.cost, PipelineCost)
        self._gpus = max(spec.gpus, 1)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Serving or draining (it answers /load as ready)."""
        return self.state in (SimReplicaPhase.READY, SimReplicaPhase.DRAINING)

    @property
    def routable(self) -> bool:
        """Takes new requests."""
        return self.state is SimReplicaPhase.READY

    @property
    def num_unfinished(self) -> int:
        """Requests waiting or running here."""
        return len(self.requests)

    def mark_ready(self, now: float) -> None:
        """Start-up is over: the replica serves from now on."""
        if self.state is SimReplicaPhase.STARTING:
            self.state = SimReplicaPhase.READY
            self.ready_at = now

    def drain(self, now: float) -> None:
        """Take no new requests; stop once the current ones are done (or now if starting)."""
        if self.state is SimReplicaPhase.STARTING or (
                self.state is SimReplicaPhase.READY and not self.requests):
            self._stop(now)
        elif self.state is SimReplicaPhase.READY:
            self.state = SimReplicaPhase.DRAINING

    def _stop(self, now: float) -> None:
        self.materialize(now)
        self.state = SimReplicaPhase.STOPPED
        self.stopped_at = now
        self._version += 1
        self.listener.on_stopped(self, now)

    # -- requests -------------------------------------------------------------------------
    def submit(self, req: SimRequest, now: float) -> None:
        """Queue a request; it joins the batch at the next step boundary."""
        seq = Sequence(req.req_id, self.prompt_ids(req),
                       SamplingParams(max_tokens=req.output_tokens), arrival_time=now)
        self.requests[req.req_id] = req
        self._waiting_sum += len(seq.prompt_token_ids)
        req.replica = self.replica_id
        req.status = "running"
        self.scheduler.add(seq)
        run = self._run
        if run is not None:
            # The engine picks the request up once the step in progress ends.
            j = run.steps_done(now - run.t0)
            if j + 1 < run.k:
                run.k = j + 1
                self._version += 1
                self.loop.at(run.t0 + run.time_of(run.k), self._on_run_end, self._version)
        elif not self._busy:
            self._real_step(now)

    # -- the engine loop ------------------------------------------------------------------
    def _set_idle(self) -> None:
        self._busy = False
        self._batch = None

    def _real_step(self, now: float) -> None:
        sched = self.scheduler
        n_before = len(sched.running)
        batch = sched.step()
        self.real_steps += 1
        self._running_prefill = None
        # Admitted sequences join the running list at its end; preempted ones went back.
        admitted = len(sched.running) - (n_before - len(batch.preempted))
        if admitted > 0:
            self._waiting_sum -= sum(s.num_tokens for s in sched.running[-admitted:])
        for seq in batch.preempted:
            self._waiting_sum += seq.num_tokens
        if not batch:
            self._set_idle()
            return
        f = StepFeatures.of(batch)
        dt = self.spec.cost.step_s(f)
        self._busy = True
        self._batch = batch
        self._waiting_after_step = len(self.scheduler.waiting)
        self.busy_s += dt
        self.busy_gpu_s += self.spec.busy_gpu_s(f, dt)
        self.steps += 1
        self._step_dt = dt
        self._step_f = f
        self.loop.at(now + dt, self._on_step_done, self._version)

    def _on_step_done(self, version: int) -> None:
        if version != self._version:
            return
        now = self.loop.now
        batch = self._batch
        assert batch is not None
        sched = self.scheduler
        sched.on_step_done(batch)
        self._running_prefill = None
        finished = False
        listener = self.listener
        for group in (batch.decodes, batch.prefills):
            for e in group:
                seq = e.seq
                out = seq.output_token_ids
                # ScheduledSeq.samples, inlined
                if e.start + e.num_tokens != len(seq.prompt_token_ids) + len(out):
                    continue
                out.append(0)
                req = self.requests[seq.seq_id]
                if len(out) == 1:
                    req.cached_tokens = seq.num_cached_tokens
                    listener.on_first_token(self, req, now)
                if len(out) >= seq.params.max_tokens:
                    self._finish(seq, req, now)
                    finished = True
        for seq in batch.preempted:
            self.requests[seq.seq_id].preemptions += 1
        self._account(batch, now)
        if self.state is SimReplicaPhase.STOPPED:
            return
        running = sched.running
        # A pure-decode step that left a waiting request unadmitted will leave it so
        # while nothing finishes or arrives (free blocks only shrink during a run).
        repeats = (not finished and not batch.prefills and not batch.preempted and running
                   and len(batch.decodes) == len(running)
                   and len(sched.waiting) == self._waiting_after_step)
        self._continue(now, repeats)

    def _continue(self, now: float, repeats: bool = False) -> None:
        """Between steps: skip a decode run when the next steps are known, else step."""
        sched = self.scheduler
        running = sched.running
        if self.fast_forward and running and (repeats or self._next_is_pure_decode()):
            if self._start_run(now):
                return
        if sched.waiting or running:
            self._real_step(now)
        else:
            self._set_idle()

    def _next_is_pure_decode(self) -> bool:
        """Whether the next ``step()`` surely schedules every running sequence as a decode
        and admits nothing (unless it runs out of blocks, which the run bounds)."""
        sched = self.scheduler
        running = sched.running
        cfg = sched.config
        n = len(running)
        if n > cfg.max_num_batched_tokens:
            return False
        if sched.waiting and n < cfg.max_num_seqs and n < cfg.max_num_batched_tokens:
            return False  # admission would be tried: only a real step knows its outcome
        for seq in running:  # (num_tokens - num_computed_tokens, without the property)
            if len(seq.prompt_token_ids) + len(seq.output_token_ids) \
                    - seq.num_computed_tokens != 1:
                return False
        return True

    def _finish(self, seq: Sequence, req: SimRequest, now: float) -> None:
        self.scheduler.finish(seq, "length")
        del self.requests[seq.seq_id]
        req.status = "ok"
        self.listener.on_finish(self, req, now)
        if self.state is SimReplicaPhase.DRAINING and not self.requests:
            self._stop(now)

    def _account(self, batch: Batch, now: float) -> None:
        """EngineCore._account: the step, recorded in the load meter."""
        f = self._step_f
        self.meter.record(now, self._step_dt, f.prefill_tokens, f.prefill_tokens + f.decodes,
                          f.sampled)

    # -- skipping pure-decode runs --------------------------------------------------------
    def _start_run(self, now: float) -> bool:
        seqs = list(self.scheduler.running)
        ntok = [len(s.prompt_token_ids) + len(s.output_token_ids) for s in seqs]
        k = min([s.params.max_tokens - len(s.output_token_ids) for s in seqs])
        bs = self.blocks.block_size
        free = self.blocks.num_free_blocks
        # Step i allocates for num_tokens + i tokens (see DecodeRun.slack).
        slack = [len(s.block_table) * bs - (n - 1) for s, n in zip(seqs, ntok, strict=True)]
        run = DecodeRun(now, 0.0, 0.0, k, seqs, slack, bs, free)
        # No sequence needs more than ceil(k / bs) blocks (slack >= 0): often that settles it.
        if (len(seqs) * -(-k // bs) > free or min(slack) < 0) and run.blocks_needed(k) > free:
            lo, hi = 0, k  # blocks_needed(lo) <= free < blocks_needed(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if run.blocks_needed(mid) <= free:
                    lo = mid
                else:
                    hi = mid
            k = lo
        if k < 1:
            return False
        a, b, k = self.spec.cost.decode_piece(len(seqs), sum(ntok), k, max(ntok))
        if a <= 0:
            return False
        run.a, run.b, run.k = a, b, k
        self._run = run
        self._batch = None
        self.loop.at(now + run.time_of(k), self._on_run_end, self._version)
        return True

    def _advance_run(self, run: DecodeRun, j: int) -> None:
        """Apply the first j skipped decode steps to the sequences and the measurements."""
        if j <= 0:
            return
        blocks = self.blocks
        caching = blocks.enable_prefix_caching
        zeros = _ZEROS[:j] if j <= len(_ZEROS) else [0] * j
        allocate = blocks.allocate
        bs = blocks.block_size
        for s in run.seqs:
            out = s.output_token_ids
            if not out:
                # A prompt whose last chunk left one token runs it as a "decode": its first
                # sample comes at the end of the run's first step.
                req = self.requests[s.seq_id]
                req.cached_tokens = s.num_cached_tokens
                self.listener.on_first_token(self, req, run.t0 + run.a)
            out += zeros
            n = s.num_computed_tokens + j
            s.num_computed_tokens = n
            # (allocate is a no-op while the table still covers n tokens: skip the call)
            if n > len(s.block_table) * bs and not allocate(s, n):
                raise AssertionError("decode run outgrew the free KV blocks")
            if caching:
                blocks.commit(s)
        n = len(run.seqs)
        dur = run.time_of(j)
        end = run.t0 + dur
        self.steps += j
        self.busy_s += dur
        if self._is_pipeline:
            cost = self.spec.cost
            assert isinstance(cost, PipelineCost)
            transfer = (len(cost.stages) - 1) * cost.transfer_s(n)
            self.busy_gpu_s += self._gpus // len(cost.stages) * (dur - j * transfer)
        else:
            self.busy_gpu_s += self._gpus * dur
        self.meter.record_decode_run(end, dur, n * j, run.a, run.b, j)
        run.shift_slack(j)
        run.free0 = blocks.num_free_blocks
        run.t0 = end
        run.a += run.b * j
        run.k -= j
        run.left -= j

    def _on_run_end(self, version: int) -> None:
        if version != self._version:
            return
        now = self.loop.now
        run = self._run
        assert run is not None
        self._run = None
        self._advance_run(run, run.k)
        if run.left <= 0:  # else no sequence reached max_tokens (a run cut short)
            for s in run.seqs:
                if len(s.output_token_ids) >= s.params.max_tokens:
                    self._finish(s, self.requests[s.seq_id], now)
        if self.state is SimReplicaPhase.STOPPED:
            return
        self._continue(now)

    def materialize(self, now: float) -> None:
        """Bring a skipped run's sequences up to the steps completed by ``now``."""
        run = self._run
        if run is not None:
            self._advance_run(run, run.steps_done(now - run.t0))

    # -- what the gateway and autoscaler read ---------------------------------------------
    def rates(self, now: float, run_steps: int | None = None) -> tuple[float, float]:
        """Prompt and generated tokens/s over the recent window (EngineCore's definition).

        Steps of a run being skipped count as if each had been recorded when it ended;
        ``run_steps`` is how many of them are done by ``now``, when the caller knows it.
        """
        run = self._run
        if run is not None:
            j = run.steps_done(now - run.t0) if run_steps is None else run_steps
            if j > 0:
                old = now - self.meter.window_s - run.t0
                j_old = run.steps_done(old) if old > 0 else 0
                if j > j_old:
                    i = j_old + 1  # the end of the oldest step in the window: run.time_of(i)
                    return self.meter.rates(now, len(run.seqs) * (j - j_old),
                                            run.t0 + (run.a * i + run.b * i * (i - 1) * 0.5))
        return self.meter.rates(now)

    def waiting_prompt_tokens(self) -> int:
        """``Scheduler.waiting_prompt_tokens()``, without summing the whole backlog each time."""
        # Skipped decode steps leave it unchanged: decodes have nothing left to prefill.
        if self._running_prefill is None:
            self._running_prefill = self._running_prefill_tokens()
        return self._waiting_sum + self._running_prefill

    def _running_prefill_tokens(self) -> int:
        # sum(s.num_uncomputed_tokens - 1 for s in running if s.is_prefill), without the
        # three property calls per sequence.
        total = 0
        for s in self.scheduler.running:
            left = len(s.prompt_token_ids) + len(s.output_token_ids) - s.num_computed_tokens
            if left > 1:
                total += left - 1
        return total

    def load_report(self, now: float) -> LoadReport:
        """GET /load as the replica would answer it now (a skipped run is not materialized)."""
        blocks = self.blocks
        meter = self.meter
        decode_step_s = meter.decode_step_s
        run = self._run
        j = 0 if run is None else run.steps_done(now - run.t0)
        if run is not None and j > 0:
            free = run.free0 - run.blocks_needed(j)
            decode_step_s = meter.decode_step_after(run.a, run.b, j)
        else:
            free = len(blocks.free_uncached) + len(blocks.free_cached)  # num_free_blocks
        prompt_rate, gen_rate = self.rates(now, j)
        sched = self.scheduler
        e = self.engine
        queried = blocks.queried_tokens  # BlockManager.stats().hit_rate, without the object
        hit_rate = blocks.hit_tokens / queried if queried else 0.0
        running_prefill = self._running_prefill  # waiting_prompt_tokens(), inlined
        if running_prefill is None:
            running_prefill = self._running_prefill = self._running_prefill_tokens()
        state = self.state
        # EngineCore.load_report's slot bound; a skipped run has decoded j more tokens each.
        slot_free = min((s.params.max_tokens - len(s.output_token_ids) for s in sched.running),
                        default=j)
        return _new_load_report(  # the fields in the order named at _new_load_report
            self.spec.model_name,
            len(sched.running),
            len(sched.waiting),
            self._waiting_sum + running_prefill,
            free,
            e.num_blocks,
            e.block_size,
            e.max_num_seqs,
            e.max_num_batched_tokens,
            hit_rate,
            prompt_rate,
            gen_rate,
            decode_step_s,
            meter.prefill_token_s,
            state is SimReplicaPhase.READY or state is SimReplicaPhase.DRAINING,
            state is SimReplicaPhase.DRAINING,
            "",
            max(0, slot_free - j),
            (),  # no LoRA adapters in a simulated replica
        )
