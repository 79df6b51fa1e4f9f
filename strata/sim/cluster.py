"""The simulated cluster: a platform that starts and drains replicas, and the autoscaler loop,
around the simulated gateway (``strata.sim.gateway``), all in virtual time.

**Platform.** A scale-up creates units (a replica, or a stage pipeline of several virtual
engines) that hold their GPUs from creation and serve after ``startup_s``; a scale-down
drains units (starting ones first, newest first, then the least loaded, as Kubernetes'
ReplicaSet controller prefers unready and newer pods), which stop once their requests finish.

**Autoscaler.** Every ``period_s`` (the cluster file's ``autoscaler.period_s``, or the
policy's ``recommended_tick_s``) it builds a ``TierState`` from the units' load reports,
the gateway's arrival window (``autoscaler.window_s``), TTFT/TPOT observations and measured
start-up times, calls ``decide(state, now)`` and applies every decision. Each unit also
reports ``custom_gpu_utilization``, its busy GPU-seconds over provisioned GPU-seconds in
the last minute: what an HPA on ``DCGM_FI_DEV_GPU_UTIL`` sees.
"""

from __future__ import annotations

import gc
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from strata.autoscale.registry import build_policy
from strata.autoscale.types import ReplicaSample, ScaleDecision, TierState
from strata.load import LoadReport
from strata.sim.events import EventLoop
from strata.sim.gateway import SimGateway
from strata.sim.perf_model import ReplicaModel
from strata.sim.replica import SimReplicaPhase, SimReplica
from strata.sim.types import EngineSettings, SimRequest

GPU_UTIL_METRIC = "custom_gpu_utilization"
_UTIL_WINDOW_S = 60.0
_UNIQUE_BASE = 1 << 24  # token ids of unique prompts: request id * 2^24 + position
_BLOCK_BASE = 1 << 62  # token ids of shared prefix blocks (never collide with the above)


@dataclass(frozen=True)
class SimSetup:
    """One simulated tier: engine, replicas, routing, autoscaling and gateway settings."""

    replica: ReplicaModel
    engine: EngineSettings  # per virtual engine
    tier: str = "engine"
    initial_units: int = 1
    autoscaling: Any = None  # an autoscaling config model (strata.autoscale.registry)
    routing_policy: str = "resource_match"
    routing_params: dict[str, Any] = field(default_factory=dict)
    virtual_engines: int = 1  # per unit: a stage pipeline keeps one micro-batch per stage
    poll_interval_s: float = 0.2
    hold_timeout_s: float = 60.0
    autoscaler_period_s: float | None = None  # None: the policy's recommended tick
    window_s: float = 60.0
    sample_period_s: float = 10.0
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.2
    prefix_block_tokens: int | None = None  # prompt tokens per trace prefix-hash block
    fast_forward: bool = True
    tail_s: float = 3600.0  # simulate at most this long after the last arrival


class _Unit:
    """What the platform scales: one replica, or a stage pipeline's virtual engines."""

    __slots__ = ("unit_id", "members", "created_at", "ready_at", "stopped_at", "state",
                 "util_samples")

    def __init__(self, unit_id: str, members: list[SimReplica], created_at: float) -> None:
        self.unit_id = unit_id
        self.members = members
        self.created_at = created_at
        self.ready_at: float | None = None
        self.stopped_at: float | None = None
        self.state = SimReplicaPhase.STARTING
        self.util_samples: deque[tuple[float, float]] = deque()

    @property
    def busy_gpu_s(self) -> float:
        """Busy GPU-seconds of all members so far."""
        return sum(m.busy_gpu_s for m in self.members)

    @property
    def in_flight(self) -> int:
        """Requests on the unit."""
        return sum(m.num_unfinished for m in self.members)


@dataclass
class SimStats:
    """Counters the report needs besides the requests."""

    provisioned_gpu_s: float = 0.0
    busy_gpu_s: float = 0.0
    units_started: int = 0
    units_stopped: int = 0
    startups: list[float] = field(default_factory=list)
    real_steps: int = 0
    steps: int = 0
    events: int = 0
    wall_s: float = 0.0
    end_s: float = 0.0


class SimCluster:
    """Gateway + platform + autoscaler around simulated replicas (module docstring)."""

    def __init__(self, setup: SimSetup, loop: EventLoop | None = None) -> None:
        self.setup = setup
        self.loop = loop or EventLoop()
        self.autoscaler = build_policy(setup.autoscaling) if setup.autoscaling else None
        chunk = setup.prefix_block_tokens or 64
        self.gateway = SimGateway(
            self.loop, setup.routing_policy, setup.routing_params, setup.replica.model_name,
            poll_interval_s=setup.poll_interval_s, hold_timeout_s=setup.hold_timeout_s,
            chunk_tokens=chunk,
            prefix_capacity=setup.engine.num_blocks * setup.engine.block_size // chunk,
            reject=self._reject)
        self.units: list[_Unit] = []
        self._unit_counter = 0
        self.desired = 0
        self.stats = SimStats()
        self.decisions: list[ScaleDecision] = []
        self.series: list[dict[str, float]] = []
        self.requests: list[SimRequest] = []
        self._arrivals: deque[tuple[float, int, int]] = deque()
        self._ttfts: deque[tuple[float, float]] = deque()
        self._tpots: deque[tuple[float, float]] = deque()
        self._last_arrival_at: float | None = None
        self._remaining = 0  # requests not yet finished or rejected
        self._arrivals_left = 0
        self._series_busy: tuple[float, float] = (0.0, 0.0)
        self._series_prov = 0.0
        self._retired: list[_Unit] = []

    # -- platform -------------------------------------------------------------------------
    def _new_unit(self, now: float, warm: bool) -> _Unit:
        s = self.setup
        uid = f"u{self._unit_counter}"
        self._unit_counter += 1
        members = []
        for v in range(s.virtual_engines):
            rid = uid if s.virtual_engines == 1 else f"{uid}.v{v}"
            members.append(SimReplica(rid, s.replica, s.engine, self.loop, self, self._prompt_ids,
                                      created_at=now, unit=uid, fast_forward=s.fast_forward))
        unit = _Unit(uid, members, now)
        self.units.append(unit)
        self.stats.units_started += 1
        if warm:
            self._unit_ready(unit, record=False)
        else:
            self.loop.at(now + s.replica.startup_s, self._unit_ready, unit)
        return unit

    def _unit_ready(self, unit: _Unit, record: bool = True) -> None:
        if unit.state is not SimReplicaPhase.STARTING:
            return
        now = self.loop.now
        unit.state = SimReplicaPhase.READY
        unit.ready_at = now
        if record:
            self.stats.startups.append(now - unit.created_at)
        for m in unit.members:
            m.mark_ready(now)
            self.gateway.add(m, now)
        self.gateway.flush_held(now)

    def _drain_unit(self, unit: _Unit, now: float) -> None:
        unit.state = SimReplicaPhase.DRAINING
        self.gateway.remove({m.replica_id for m in unit.members})
        for m in unit.members:
            m.drain(now)

    def on_stopped(self, replica: SimReplica, now: float) -> None:
        """A member stopped; the unit stops with its last member."""
        for unit in self.units:
            if unit.unit_id == replica.unit and unit.state is not SimReplicaPhase.STOPPED:
                if all(m.state is SimReplicaPhase.STOPPED for m in unit.members):
                    self._stop_unit(unit, now)
                return

    def _stop_unit(self, unit: _Unit, now: float) -> None:
        unit.state = SimReplicaPhase.STOPPED
        unit.stopped_at = now
        self.stats.units_stopped += 1
        self.stats.provisioned_gpu_s += (now - unit.created_at) * self._unit_gpus()
        self.units.remove(unit)
        self._retired.append(unit)

    def _unit_gpus(self) -> int:
        return max(self.setup.replica.gpus, 1)

    def live_units(self) -> list[_Unit]:
        """Units starting or ready (what ``current_replicas`` counts)."""
        return [u for u in self.units
                if u.state in (SimReplicaPhase.STARTING, SimReplicaPhase.READY)]

    def scale_to(self, desired: int, now: float) -> None:
        """Create or drain units so that ``desired`` are starting or ready."""
        self.desired = desired
        live = self.live_units()
        if desired > len(live):
            for _ in range(desired - len(live)):
                self._new_unit(now, warm=False)
        elif desired < len(live):
            starting = [u for u in live if u.state is SimReplicaPhase.STARTING]
            ready = [u for u in live if u.state is SimReplicaPhase.READY]
            order = sorted(starting, key=lambda u: -u.created_at) + sorted(
                ready, key=lambda u: (u.in_flight, -(u.ready_at or 0.0)))
            for unit in order[: len(live) - desired]:
                self._drain_unit(unit, now)

    # -- requests -------------------------------------------------------------------------
    def _prompt_ids(self, req: SimRequest) -> list[int]:
        n = req.prompt_tokens
        if not self.setup.engine.prefix_caching:
            return [0] * n  # nothing reads the values without a prefix cache
        ids: list[int] = []
        bt = self.setup.prefix_block_tokens
        if req.hash_ids and bt:
            for h in req.hash_ids:
                take = min(bt, n - len(ids))
                if take <= 0:
                    break
                base = _BLOCK_BASE + h * bt
                ids.extend(range(base, base + take))
        if len(ids) < n:
            base = (req.req_id + 1) * _UNIQUE_BASE + len(ids)
            ids.extend(range(base, base + n - len(ids)))
        return ids

    def _arrive(self, req: SimRequest) -> None:
        now = self.loop.now
        self._arrivals_left -= 1
        self._arrivals.append((now, req.prompt_tokens, req.output_tokens))
        self._last_arrival_at = now
        s = self.setup
        fits = math.ceil((req.prompt_tokens + req.output_tokens) / s.engine.block_size)
        if req.prompt_tokens + req.output_tokens > s.engine.max_model_len or \
                fits > s.engine.num_blocks:
            self._reject(req, "rejected")
            return
        self.gateway.route(req, now, s.prefix_block_tokens)

    def _reject(self, req: SimRequest, status: str) -> None:
        req.status = status
        self._remaining -= 1

    # -- replica events -------------------------------------------------------------------
    def on_first_token(self, replica: SimReplica, req: SimRequest, now: float) -> None:
        """Record TTFT (as the client sees it) for the autoscaler's window."""
        req.first_token_s = now + replica.spec.request_overhead_s
        self._ttfts.append((now, req.first_token_s - req.arrival_s))

    def on_finish(self, replica: SimReplica, req: SimRequest, now: float) -> None:
        """Record E2E/TPOT and update the gateway's counts."""
        req.finish_s = now + replica.spec.request_overhead_s
        if req.output_tokens > 1:
            self._tpots.append((now, (req.finish_s - req.first_token_s)
                                / (req.output_tokens - 1)))
        self._remaining -= 1
        self.gateway.finished(replica.replica_id, now)

    # -- autoscaler and monitoring --------------------------------------------------------
    def _unit_report(self, unit: _Unit, now: float) -> LoadReport:
        reports = [m.load_report(now) for m in unit.members]
        if len(reports) == 1:
            return reports[0]
        n = len(reports)
        first = reports[0]
        return replace(
            first,
            running=sum(r.running for r in reports), waiting=sum(r.waiting for r in reports),
            waiting_prompt_tokens=sum(r.waiting_prompt_tokens for r in reports),
            free_kv_blocks=sum(r.free_kv_blocks for r in reports),
            total_kv_blocks=sum(r.total_kv_blocks for r in reports),
            max_num_seqs=sum(r.max_num_seqs for r in reports),
            prompt_tokens_per_s=sum(r.prompt_tokens_per_s for r in reports),
            generation_tokens_per_s=sum(r.generation_tokens_per_s for r in reports),
            decode_step_s=sum(r.decode_step_s for r in reports) / n,
            prefill_token_s=sum(r.prefill_token_s for r in reports) / n)

    def _gpu_util(self, unit: _Unit, now: float) -> float:
        samples = unit.util_samples
        busy = unit.busy_gpu_s
        samples.append((now, busy))
        while len(samples) > 2 and samples[1][0] <= now - _UTIL_WINDOW_S:
            samples.popleft()
        t0, b0 = samples[0]
        if now - t0 <= 0:
            return 0.0
        return min(1.0, (busy - b0) / ((now - t0) * self._unit_gpus()))

    def tier_state(self, now: float) -> TierState:
        """What the autoscaler observes now (module docstring)."""
        w = self.setup.window_s
        cutoff = now - w
        for dq in (self._arrivals, self._ttfts, self._tpots):
            while dq and dq[0][0] < cutoff:
                dq.popleft()
        samples = []
        for unit in self.units:
            report = self._unit_report(unit, now) if unit.state is not SimReplicaPhase.STARTING \
                else None
            util = self._gpu_util(unit, now) if report is not None else 0.0
            samples.append(ReplicaSample(
                replica_id=unit.unit_id, started_at=unit.created_at,
                ready=unit.state in (SimReplicaPhase.READY, SimReplicaPhase.DRAINING),
                ready_changed_at=unit.ready_at,
                terminating=unit.state is SimReplicaPhase.DRAINING, report=report,
                in_flight=unit.in_flight,
                extra={GPU_UTIL_METRIC: util} if report is not None else {}))
        arrivals = self._arrivals
        n = len(arrivals)
        span = min(w, now) if now > 0 else w
        return TierState(
            tier=self.setup.tier, current_replicas=self.desired, replicas=tuple(samples),
            arrival_rate_rps=n / span if span > 0 else 0.0,
            mean_prompt_tokens=sum(a[1] for a in arrivals) / n if n else 0.0,
            mean_output_tokens=sum(a[2] for a in arrivals) / n if n else 0.0,
            pending_requests=len(self.gateway.held),
            in_flight_requests=sum(u.in_flight for u in self.units),
            last_request_at=self._last_arrival_at,
            ttft_s=tuple(t for _, t in self._ttfts), tpot_s=tuple(t for _, t in self._tpots),
            startup_s=tuple(self.stats.startups[-10:]))

    def _tick(self) -> None:
        now = self.loop.now
        assert self.autoscaler is not None
        decision = self.autoscaler.decide(self.tier_state(now), now)
        self.decisions.append(decision)
        self.scale_to(decision.desired, now)
        if not self._finished():
            self.loop.at(now + self._period(), self._tick)

    def _period(self) -> float:
        if self.setup.autoscaler_period_s is not None:
            return self.setup.autoscaler_period_s
        assert self.autoscaler is not None
        return float(self.autoscaler.recommended_tick_s)

    def _sample(self) -> None:
        now = self.loop.now
        live = self.units
        busy = sum(u.busy_gpu_s for u in live) + self._retired_busy()
        prov = self._provisioned_gpu_s(now)
        t_prev, b_prev = self._series_busy
        p_prev = self._series_prov
        util = (busy - b_prev) / (prov - p_prev) if prov > p_prev else 0.0
        self._series_busy = (now, busy)
        self._series_prov = prov
        w = self.setup.sample_period_s
        # Arrivals are appended in time order: count the window's from the newest back
        # (without an autoscaler nothing trims the deque, so a full scan grows with the run).
        arrived = 0
        since = now - w
        for a in reversed(self._arrivals):
            if a[0] <= since:
                break
            arrived += 1
        self.series.append({
            "t_s": now,
            "desired": float(self.desired),
            "ready": float(sum(1 for u in live if u.state is SimReplicaPhase.READY)),
            "starting": float(sum(1 for u in live if u.state is SimReplicaPhase.STARTING)),
            "draining": float(sum(1 for u in live if u.state is SimReplicaPhase.DRAINING)),
            "gpus": float(len(live) * self._unit_gpus()),
            "arrival_rps": arrived / w,
            "gpu_util": util,
            "held": float(len(self.gateway.held)),
            "in_flight": float(sum(u.in_flight for u in live)),
        })
        if not self._finished():
            self.loop.at(now + w, self._sample)

    def _retired_busy(self) -> float:
        return sum(u.busy_gpu_s for u in self._retired)

    def _provisioned_gpu_s(self, now: float) -> float:
        return self.stats.provisioned_gpu_s + sum(
            (now - u.created_at) * self._unit_gpus() for u in self.units)

    def _finished(self) -> bool:
        return self._arrivals_left == 0 and self._remaining <= 0

    # -- running --------------------------------------------------------------------------
    def run(self, requests: Iterable[SimRequest]) -> SimStats:
        """Replay the requests (sorted by arrival) to completion; returns the counters."""
        wall0 = time.perf_counter()
        reqs = list(requests)
        self.requests = reqs
        self._remaining = len(reqs)
        self._arrivals_left = len(reqs)
        loop = self.loop
        start = loop.now
        for _ in range(self.setup.initial_units):
            self._new_unit(start, warm=True)
        self.desired = self.setup.initial_units
        loop.at_each([req.arrival_s for req in reqs], self._arrive, [(req,) for req in reqs])
        if self.autoscaler is not None:
            loop.at(start, self._tick)
        loop.at(start, self._sample)
        last = reqs[-1].arrival_s if reqs else start
        # The loop allocates many short-lived objects and no reference cycles of its own;
        # the cyclic collector's passes over the growing heap of requests and sequences
        # would be pure overhead (about a tenth of the run), so it pauses until the end.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            loop.run(until_s=last + self.setup.tail_s)
        finally:
            if gc_was_enabled:
                gc.enable()
        end = loop.now
        for u in list(self.units):
            for m in u.members:
                m.materialize(end)
        for req in reqs:
            if req.status in ("pending", "running"):
                req.status = "unfinished"
        st = self.stats
        st.end_s = end
        st.provisioned_gpu_s = self._provisioned_gpu_s(end)
        everyone = self.units + self._retired
        st.busy_gpu_s = sum(u.busy_gpu_s for u in everyone)
        st.real_steps = sum(m.real_steps for u in everyone for m in u.members)
        st.steps = sum(m.steps for u in everyone for m in u.members)
        st.events = loop.processed
        st.wall_s = time.perf_counter() - wall0
        return st
