"""The Kubernetes HorizontalPodAutoscaler, exactly, as a pure strata policy.

Matches the HPA controller of **Kubernetes v1.34** (``pkg/controller/podautoscaler``:
``horizontal.go`` and ``replica_calculator.go``; ``pkg/apis/autoscaling/v2/defaults.go``;
the "Horizontal Pod Autoscaling" task page), including the per-direction ``tolerance`` of
``behavior`` (KEP-4951, ``HPAConfigurableTolerance``). One decision is one reconcile:

1. **Propose** per metric (``replica_calculator``): ``ceil(ready * current / target)``
   with the 0.1 tolerance, missing-metric and unready-replica handling; the largest
   proposal over all metrics wins. If every metric fails, or some fail and the others
   would scale down, nothing changes (so a broken metric can never shrink the tier).
2. **Stabilize and rate-limit** (``behavior``): the legacy path when ``behavior`` is
   absent, the ``behavior`` rules with their API defaults when present.
3. **Clamp** to ``[min_replicas, max_replicas]``; a current count outside the bounds is
   brought back at once; a target at zero replicas with ``min_replicas >= 1`` is left
   alone ("scaling is disabled since the replica count of the target is zero").

strata's metric sources map onto Kubernetes' metric types: ``replica`` metrics are Pods
or Resource metrics (``Utilization`` in percent of the replicas' capacity, weighted by
each replica's ``capacity`` as Kubernetes weights by each pod's request, or
``AverageValue``), ``tier`` metrics are External metrics (``Value`` or ``AverageValue``).
Where strata goes beyond Kubernetes: ``min_replicas: 0`` is accepted for any metric (the
HPA needs the alpha ``HPAScaleToZero`` gate and an Object/External metric), with the
activation and idle-wait rules of ``strata.autoscale.zero``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from strata.autoscale.behavior import (
    DEFAULT_DOWNSCALE_STABILIZATION_S,
    DEFAULT_TOLERANCE,
    Behavior,
)
from strata.autoscale.finish import BehaviorConfig, Proposal, ScaleFinish
from strata.autoscale.replica_calculator import (
    MetricUnavailable,
    ReadinessRules,
    Tolerances,
    average_value_replicas,
    group_replicas,
    tier_average_value_replicas,
    tier_value_replicas,
    utilization_replicas,
)
from strata.autoscale.types import (
    REPLICA_METRICS,
    TIER_METRICS,
    ConfigModel,
    ScaleDecision,
    TierState,
)

CUSTOM_PREFIX = "custom_"


class HpaMetric(ConfigModel):
    """One metric and its target, as in an HPA's ``spec.metrics`` list."""

    name: str
    source: Literal["replica", "tier"] = "replica"
    type: Literal["Utilization", "AverageValue", "Value"] = "Utilization"
    average_utilization: int | None = Field(default=None, gt=0)  # percent
    average_value: float | None = Field(default=None, gt=0)
    value: float | None = Field(default=None, gt=0)
    warmup_sensitive: bool = False  # Kubernetes' CPU initialization-period rules

    @model_validator(mode="after")
    def _check(self) -> HpaMetric:
        known = REPLICA_METRICS if self.source == "replica" else TIER_METRICS
        if self.name not in known and not self.name.startswith(CUSTOM_PREFIX):
            raise ValueError(
                f"metrics[].name {self.name!r} is not a {self.source} metric; use one of "
                f"{', '.join(sorted(known))} or a name starting with {CUSTOM_PREFIX!r} "
                "(read from the sample's extra values)"
            )
        allowed = (
            ("Utilization", "AverageValue")
            if self.source == "replica"
            else ("Value", "AverageValue")
        )
        if self.type not in allowed:
            raise ValueError(
                f"metrics[].type {self.type!r} is not valid for a {self.source} metric; "
                f"use one of {', '.join(allowed)}"
            )
        field = {
            "Utilization": "average_utilization",
            "AverageValue": "average_value",
            "Value": "value",
        }[self.type]
        if getattr(self, field) is None:
            raise ValueError(
                f"metric {self.name!r} of type {self.type} needs a target: set {field}"
            )
        return self

    @property
    def label(self) -> str:
        """The metric's name as used in decision metrics and reasons."""
        return self.name


def _default_metrics() -> tuple[HpaMetric, ...]:
    # Kubernetes defaults to 80 % CPU utilization; strata's resource-like analogue is KV usage.
    return (HpaMetric(name="kv_usage", type="Utilization", average_utilization=80),)


class HpaConfig(BehaviorConfig):
    """``autoscaling: {policy: hpa, ...}``; defaults are Kubernetes' own."""

    policy: Literal["hpa"] = "hpa"
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(ge=1)
    metrics: tuple[HpaMetric, ...] = Field(default_factory=_default_metrics, min_length=1)
    behavior: Behavior | None = None
    # kube-controller-manager flags
    tolerance: float = Field(default=DEFAULT_TOLERANCE, ge=0.0)
    downscale_stabilization_s: int = Field(default=DEFAULT_DOWNSCALE_STABILIZATION_S, ge=0)
    cpu_initialization_period_s: float = Field(default=300.0, ge=0.0)
    initial_readiness_delay_s: float = Field(default=30.0, ge=0.0)
    metric_window_s: float = Field(default=15.0, ge=0.0)
    # strata's scale-to-zero (used only when min_replicas is 0)
    scale_to_zero_grace_s: float = Field(default=30.0, ge=0.0)
    scale_to_zero_retention_s: float = Field(default=0.0, ge=0.0)


class HpaPolicy:
    """A Kubernetes HPA for one tier; its history lives here and advances only in ``decide``."""

    name = "hpa"
    recommended_tick_s = 15.0  # --horizontal-pod-autoscaler-sync-period

    def __init__(self, config: HpaConfig) -> None:
        self.config = config
        self.finish = ScaleFinish.with_behavior(config, disabled_at_zero=True)
        self.readiness = ReadinessRules(
            initialization_period_s=config.cpu_initialization_period_s,
            initial_readiness_delay_s=config.initial_readiness_delay_s,
            metric_window_s=config.metric_window_s,
        )

    def propose(
        self, metric: HpaMetric, state: TierState, now: float, tolerances: Tolerances
    ) -> tuple[int, float]:
        """One metric's replica proposal and its current value (``computeReplicasForMetric``)."""
        current = state.current_replicas
        if metric.source == "tier":
            value = state.metric(metric.name)
            if value is None:
                raise MetricUnavailable(f"tier metric {metric.name} is not observed")
            if metric.type == "Value":
                assert metric.value is not None
                if current != 0 and not state.replicas:
                    raise MetricUnavailable("no replicas to count for a tier-wide value")
                return tier_value_replicas(
                    current, value, metric.value, state.ready_count, tolerances
                ), value
            assert metric.average_value is not None
            status = len(state.live_replicas)
            return tier_average_value_replicas(
                status, value, metric.average_value, tolerances
            ), value
        if not state.replicas:
            raise MetricUnavailable("no replicas to read a per-replica metric from")
        values = {
            r.replica_id: v for r in state.replicas if (v := r.metric(metric.name)) is not None
        }
        groups = group_replicas(
            state.replicas,
            values,
            now=now,
            warmup_sensitive=metric.warmup_sensitive,
            rules=self.readiness,
        )
        if metric.type == "Utilization":
            assert metric.average_utilization is not None
            capacities = {r.replica_id: r.capacity for r in state.replicas}
            replicas, utilization = utilization_replicas(
                current, metric.average_utilization, values, groups, tolerances, capacities
            )
            return replicas, float(utilization)
        assert metric.average_value is not None
        return average_value_replicas(current, metric.average_value, values, groups, tolerances)

    def proposal(self, state: TierState, now: float) -> Proposal:
        """The largest valid proposal over the metrics, or none when a broken metric could
        shrink the tier (if every metric fails, or some fail and the rest would scale down)."""
        tolerances = self.finish.tolerances
        best: int | None = None
        best_metric = ""
        errors: list[str] = []
        report: dict[str, float] = {}
        for metric in self.config.metrics:
            try:
                replicas, value = self.propose(metric, state, now, tolerances)
            except MetricUnavailable as err:
                errors.append(f"{metric.label}: {err}")
                continue
            report[metric.label] = value
            report[f"{metric.label}.proposal"] = float(replicas)
            if best is None or replicas > best:
                best, best_metric = replicas, metric.label
        error = ""
        if errors:
            error = f"invalid metrics ({len(errors)} of {len(self.config.metrics)}): {'; '.join(errors)}"
        current = state.current_replicas
        if best is None or (errors and best < current):
            why = f"FailedComputeMetricsReplicas: {error or 'no metric proposal'}"
            return Proposal(None, [why], report)
        reasons = [error] if error else []
        best = max(best, 0)
        if best > current:
            reasons.append(f"{best_metric} above target")
        elif best < current:
            reasons.append("all metrics below target")
        else:
            reasons.append("metrics within tolerance of target")
        return Proposal(best, reasons, report)

    def decide(self, state: TierState, now: float) -> ScaleDecision:
        """One HPA reconcile for the tier at ``now``; metrics are read only within bounds."""
        return self.finish.decide(self.name, state, now, lambda: self.proposal(state, now))
