"""LLM-aware autoscaling: scale on the signals that predict an LLM tier's latency.

CPU-style utilization says little about an inference engine; what matters is whether the
KV cache is filling, requests are queueing, the latency SLOs hold, and whether demand
exceeds what the replicas can process. Each signal proposes a replica count and the
largest wins (like the HPA over several metrics):

* ``kv``: mean KV-cache usage vs ``target_kv_usage`` (0.75), with the HPA's utilization
  calculation (tolerance, missing and not-yet-ready replicas).
* ``queue``: waiting requests (on the replicas plus held by the activator) per replica vs
  ``target_waiting_per_replica``; this one also works from zero replicas. A backlog is a
  stock, not a flow: while new replicas start it keeps growing, and ``ceil(waiting /
  target)`` would keep adding replicas that cannot help yet. So once replicas are ready
  the queue may propose at most ``queue_max_step`` times the ready count (never less than
  the current count), the way the HPA dampens scale-ups by counting unready pods as idle.
* ``ttft``/``tpot``: the SLO percentile (p90) of recent observations vs the SLO. A
  violation scales up in proportion (``ceil(ready * p90 / slo)``, at most ``slo_max_step``
  times per decision, never down); a p90 within ``slo_scale_down_headroom`` of the SLO
  holds the current count, so a scale-down cannot eat the last of the margin.
* ``capacity``: arriving tokens/s over what one replica sustains times
  ``target_utilization``; the per-replica capacity is learned online
  (``strata.autoscale.capacity``).

The proposal then goes through the HPA's behaviour step (stabilization windows, rate
policies; by default Kubernetes' default behaviour with a 300 s scale-down window) and
the min/max and scale-to-zero rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from strata.autoscale.behavior import (
    DEFAULT_DOWNSCALE_STABILIZATION_S,
    DEFAULT_TOLERANCE,
    Behavior,
)
from strata.autoscale.capacity import CapacityEstimator
from strata.autoscale.finish import BehaviorConfig, Proposal, ScaleFinish
from strata.autoscale.replica_calculator import (
    MetricUnavailable,
    Tolerances,
    group_replicas,
    tier_average_value_replicas,
    utilization_replicas,
)
from strata.autoscale.types import ScaleDecision, TierState, percentile


class LlmConfig(BehaviorConfig):
    """``autoscaling: {policy: llm, ...}``."""

    policy: Literal["llm"] = "llm"
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(ge=1)
    target_kv_usage: float = Field(default=0.75, gt=0.0, le=1.0)
    target_waiting_per_replica: float = Field(default=2.0, gt=0.0)
    queue_max_step: float = Field(default=2.0, ge=1.0)
    ttft_slo_s: float | None = Field(default=None, gt=0.0)
    tpot_slo_s: float | None = Field(default=None, gt=0.0)
    slo_percentile: float = Field(default=90.0, gt=0.0, le=100.0)
    slo_min_observations: int = Field(default=10, ge=1)
    slo_max_step: float = Field(default=2.0, ge=1.0)
    slo_scale_down_headroom: float = Field(default=0.8, gt=0.0, le=1.0)
    target_utilization: float = Field(default=0.8, gt=0.0, le=1.0)
    capacity_ewma_alpha: float = Field(default=0.2, gt=0.0, le=1.0)
    saturation_kv_usage: float = Field(default=0.9, gt=0.0, le=1.0)
    initial_capacity_tokens_per_s: float | None = Field(default=None, gt=0.0)
    tolerance: float = Field(default=DEFAULT_TOLERANCE, ge=0.0)
    behavior: Behavior = Field(default_factory=Behavior)
    downscale_stabilization_s: int = Field(default=DEFAULT_DOWNSCALE_STABILIZATION_S, ge=0)
    scale_to_zero_grace_s: float = Field(default=30.0, ge=0.0)
    scale_to_zero_retention_s: float = Field(default=0.0, ge=0.0)


@dataclass(slots=True)
class Recommendation:
    """A raw proposal (before behaviour), the signal behind it, and the evidence."""

    replicas: int | None
    signal: str = ""
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class LlmRecommender:
    """The LLM signals and the capacity estimate; holds only the estimator's history."""

    def __init__(self, config: LlmConfig) -> None:
        self.config = config
        self.capacity = CapacityEstimator(
            alpha=config.capacity_ewma_alpha,
            saturation_kv_usage=config.saturation_kv_usage,
            initial_tokens_per_s=config.initial_capacity_tokens_per_s,
        )

    def _slo_proposal(
        self,
        name: str,
        observations: tuple[float, ...],
        slo: float | None,
        state: TierState,
        tolerances: Tolerances,
        rec: Recommendation,
    ) -> int | None:
        cfg = self.config
        if slo is None or len(observations) < cfg.slo_min_observations:
            return None
        p = percentile(observations, cfg.slo_percentile)
        assert p is not None
        ratio = p / slo
        rec.metrics[f"{name}_p{cfg.slo_percentile:g}_s"] = p
        rec.metrics[f"{name}_slo_ratio"] = ratio
        rec.metrics[f"{name}_attainment"] = sum(1 for o in observations if o <= slo) / len(
            observations
        )
        current = state.current_replicas
        if ratio > 1.0 + tolerances.scale_up:
            step = min(ratio, cfg.slo_max_step)
            return max(math.ceil(max(state.ready_count, 1) * step), current)
        if ratio > cfg.slo_scale_down_headroom:
            return current
        return None

    def recommend(self, state: TierState, now: float, tolerances: Tolerances) -> Recommendation:
        """The largest proposal over the signals that have something to say now."""
        cfg = self.config
        rec = Recommendation(replicas=None)
        current = state.current_replicas
        proposals: dict[str, int] = {}

        kv_values = {
            r.replica_id: v for r in state.replicas if (v := r.metric("kv_usage")) is not None
        }
        if state.replicas:
            groups = group_replicas(state.replicas, kv_values, now=now)
            try:
                kv_replicas, kv_util = utilization_replicas(
                    current, round(cfg.target_kv_usage * 100), kv_values, groups, tolerances
                )
            except MetricUnavailable as err:
                rec.notes.append(f"kv: {err}")
            else:
                proposals["kv"] = kv_replicas
                rec.metrics["kv_usage"] = kv_util / 100.0

        live = state.live_replicas
        waiting = state.pending_requests + sum(
            r.report.waiting for r in live if r.report is not None
        )
        rec.metrics["waiting"] = float(waiting)
        queue = tier_average_value_replicas(
            len(live), float(waiting), cfg.target_waiting_per_replica, tolerances
        )
        if state.ready_count > 0:
            cap = max(math.ceil(state.ready_count * cfg.queue_max_step), current)
            if queue > cap:
                rec.notes.append(f"queue proposal {queue} capped at {cap} (ready x step)")
                queue = cap
        proposals["queue"] = queue

        for name, obs, slo in (
            ("ttft", state.ttft_s, cfg.ttft_slo_s),
            ("tpot", state.tpot_s, cfg.tpot_slo_s),
        ):
            slo_replicas = self._slo_proposal(name, obs, slo, state, tolerances, rec)
            if slo_replicas is not None:
                proposals[name] = slo_replicas

        self.capacity.observe(state.replicas)
        capacity = self.capacity.tokens_per_s
        demand = state.arrival_tokens_per_s
        rec.metrics["demand_tokens_per_s"] = demand
        if capacity is not None:
            rec.metrics["capacity_tokens_per_s"] = capacity
            proposals["capacity"] = tier_average_value_replicas(
                len(live), demand, capacity * cfg.target_utilization, tolerances
            )

        for signal, replicas in proposals.items():
            rec.metrics[f"{signal}.proposal"] = float(replicas)
        if not proposals:
            return rec
        rec.signal, rec.replicas = max(proposals.items(), key=lambda kv: kv[1])
        return rec


class LlmPolicy:
    """The LLM-aware policy for one tier: signals, then the HPA behaviour step, then bounds."""

    name = "llm"
    recommended_tick_s = 5.0  # load reports refresh about this often

    def __init__(self, config: LlmConfig) -> None:
        self.config = config
        self.recommender = LlmRecommender(config)
        self.finish = ScaleFinish.with_behavior(config, hold_reason="no signal available: holding")

    def _raw(self, state: TierState, now: float) -> Recommendation:
        """The unstabilized proposal; the predictive policy overrides this."""
        rec = self.recommender.recommend(state, now, self.finish.tolerances)
        if rec.replicas is not None:
            rec.notes.insert(0, f"{rec.signal} signal drives {rec.replicas} replica(s)")
        return rec

    def decide(self, state: TierState, now: float) -> ScaleDecision:
        """The desired replica count for the tier at ``now``.

        The signals are read every tick (the capacity estimate and the forecast learn from
        each), and reported even when the current count is outside the bounds.
        """
        rec = self._raw(state, now)
        return self.finish.decide(self.name, state, now, Proposal(rec.replicas, rec.notes,
                                                                  rec.metrics))
