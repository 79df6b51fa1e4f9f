"""Kubernetes' replica calculation, per metric: the first of the HPA's three steps.

This follows ``pkg/controller/podautoscaler/replica_calculator.go`` of Kubernetes v1.34
(learned from, not copied). For each metric it proposes a replica count from the usage
ratio ``current / target``:

* no change while the ratio is within the tolerance ``[1 - down, 1 + up]`` (0.1 each);
* otherwise ``ceil(ratio * ready replicas)``;
* replicas without a metric ("missing") are assumed to use 100 % of the target
  (``max(100 %, target)`` for utilization) on a scale-down and 0 on a scale-up;
* not-yet-ready replicas are left out, and counted as using 0 only on a scale-up;
* after filling those in, the ratio is recomputed, and the proposal is dropped (current
  count kept) when the new ratio is within tolerance or would reverse the direction.

Values are quantised to milli-units and utilization to whole percent, as Kubernetes'
resource quantities and ``int32`` percentages are, so boundary cases round the same way.

Utilization is weighted by each replica's capacity, as Kubernetes weights it by each pod's
request: ``sum(usage) / sum(capacity)`` over the replicas counted, where a replica's usage
is its fraction times its capacity, in thousandths of the capacity's unit (millicores,
when the capacity is cores); a missing replica's fallback is a share of its own capacity.
Replicas of capacity 1.0 (the default) give the plain mean of the fractions.

Mapping of replicas onto Kubernetes' pod groups (``groupPods``): a terminating replica is
ignored (deletion timestamp set); a replica that has never been ready is "Pending", hence
unready; a replica without a value is missing; for ``warmup_sensitive`` metrics (Kubernetes
applies this to CPU only) the CPU initialization-period rules decide readiness.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from strata.autoscale.types import ReplicaSample


class MetricUnavailable(Exception):
    """No replica count can be computed from this metric now (an HPA "invalid metric")."""


@dataclass(frozen=True, slots=True)
class Tolerances:
    """How far the usage ratio may stray from 1.0 before the HPA acts, per direction."""

    scale_down: float = 0.1
    scale_up: float = 0.1

    def within(self, ratio: float) -> bool:
        """True when a ratio is too close to 1.0 to justify any change."""
        return (1.0 - self.scale_down) <= ratio <= (1.0 + self.scale_up)


@dataclass(frozen=True, slots=True)
class ReadinessRules:
    """The kube-controller-manager flags that decide whether a warming-up sample counts."""

    initialization_period_s: float = 300.0  # --horizontal-pod-autoscaler-cpu-initialization-period
    initial_readiness_delay_s: float = 30.0  # --horizontal-pod-autoscaler-initial-readiness-delay
    metric_window_s: float = 15.0  # the window a replica's metric sample averages over


@dataclass(frozen=True, slots=True)
class ReplicaGroups:
    """Replicas split the way the HPA splits pods before computing a ratio."""

    ready_count: int
    unready: frozenset[str]
    missing: frozenset[str]
    ignored: frozenset[str]


def _milli(value: float) -> int:
    """A value as an integer count of thousandths, like a Kubernetes quantity's MilliValue."""
    return int(round(value * 1000.0))


def group_replicas(
    replicas: Iterable[ReplicaSample],
    values: Mapping[str, float],
    *,
    now: float,
    warmup_sensitive: bool = False,
    rules: ReadinessRules | None = None,
) -> ReplicaGroups:
    """Split replicas into ready / unready / missing / ignored as ``groupPods`` does."""
    rules = rules or ReadinessRules()
    ready_count = 0
    unready: set[str] = set()
    missing: set[str] = set()
    ignored: set[str] = set()
    for rep in replicas:
        rid = rep.replica_id
        if rep.terminating:
            ignored.add(rid)
            continue
        if not rep.has_been_ready:  # still starting: Kubernetes' Pending phase
            unready.add(rid)
            continue
        if rid not in values:
            missing.add(rid)
            continue
        if warmup_sensitive:
            assert rep.ready_changed_at is not None
            sampled_at = now if rep.sampled_at is None else rep.sampled_at
            if rep.started_at + rules.initialization_period_s > now:
                # Within the initialization period: ignore the sample unless the replica is
                # ready and a whole metric window was collected since it became ready.
                not_ready = (not rep.ready) or (
                    sampled_at < rep.ready_changed_at + rules.metric_window_s
                )
            else:
                # Later: ignore it only if the replica is unready and has never been ready.
                not_ready = (not rep.ready) and (
                    rep.started_at + rules.initial_readiness_delay_s > rep.ready_changed_at
                )
            if not_ready:
                unready.add(rid)
                continue
        ready_count += 1
    return ReplicaGroups(ready_count, frozenset(unready), frozenset(missing), frozenset(ignored))


def _utilization(metrics: Mapping[str, int], requests: Mapping[str, int]) -> int:
    """Whole-percent ``sum(usage) * 100 // sum(request)`` over the replicas with a metric
    (Kubernetes' ``GetResourceUtilizationRatio``); both in thousandths of a capacity unit."""
    return (sum(metrics.values()) * 100) // sum(requests[rid] for rid in metrics)


def _capacities(replica_ids: Iterable[str],
                capacities: Mapping[str, float] | None) -> dict[str, float]:
    """Each replica's capacity (1.0 when not given), like a pod's request."""
    out: dict[str, float] = {}
    for rid in replica_ids:
        cap = 1.0 if capacities is None else capacities.get(rid, 1.0)
        if _milli(cap) <= 0:
            raise MetricUnavailable(f"replica {rid} has no capacity ({cap}); cannot weight it")
        out[rid] = cap
    return out


def _settle(
    current: int,
    usage_ratio: float,
    new_usage_ratio: float,
    counted: int,
    tolerances: Tolerances,
) -> int:
    """The re-check after filling in missing/unready replicas: never flip the direction."""
    if (
        tolerances.within(new_usage_ratio)
        or (usage_ratio < 1.0 and new_usage_ratio > 1.0)
        or (usage_ratio > 1.0 and new_usage_ratio < 1.0)
    ):
        return current
    new_replicas = math.ceil(new_usage_ratio * counted)
    if (new_usage_ratio < 1.0 and new_replicas > current) or (
        new_usage_ratio > 1.0 and new_replicas < current
    ):
        return current
    return new_replicas


def utilization_replicas(
    current: int,
    target_utilization: int,
    values: Mapping[str, float],
    groups: ReplicaGroups,
    tolerances: Tolerances,
    capacities: Mapping[str, float] | None = None,
) -> tuple[int, int]:
    """Replicas for a per-replica utilization target in percent (``GetResourceReplicas``).

    ``values`` are fractions of each replica's own capacity (e.g. ``kv_usage``) and
    ``capacities`` the replicas' sizes (Kubernetes' pod requests; 1.0 when absent), so a
    large replica's load counts for more. Returns the proposal and the current utilization
    in whole percent.
    """
    if target_utilization <= 0:
        raise ValueError(f"target utilization must be > 0 %, got {target_utilization}")
    dropped = groups.ignored | groups.unready
    kept = [rid for rid in values if rid not in dropped]
    if not kept:
        raise MetricUnavailable(
            "did not receive metrics for targeted replicas (they may be unready)"
        )
    caps = _capacities([*kept, *groups.missing, *groups.unready], capacities)
    requests = {rid: _milli(cap) for rid, cap in caps.items()}
    # usage in thousandths of a capacity unit, as Kubernetes counts millicores
    metrics = {rid: _milli(values[rid] * caps[rid]) for rid in kept}
    utilization = _utilization(metrics, requests)
    usage_ratio = utilization / target_utilization

    scale_up_with_unready = bool(groups.unready) and usage_ratio > 1.0
    if not scale_up_with_unready and not groups.missing:
        if tolerances.within(usage_ratio):
            return current, utilization
        return math.ceil(usage_ratio * groups.ready_count), utilization

    if groups.missing:
        if usage_ratio < 1.0:
            # a share of the replica's own capacity: 100 % or the target when above it
            fallback = max(100, target_utilization)
            metrics.update({rid: requests[rid] * fallback // 100 for rid in groups.missing})
        elif usage_ratio > 1.0:
            metrics.update({rid: 0 for rid in groups.missing})
    if scale_up_with_unready:
        metrics.update({rid: 0 for rid in groups.unready})

    new_utilization = _utilization(metrics, requests)
    new_ratio = new_utilization / target_utilization
    return _settle(current, usage_ratio, new_ratio, len(metrics), tolerances), utilization


def average_value_replicas(
    current: int,
    target_average: float,
    values: Mapping[str, float],
    groups: ReplicaGroups,
    tolerances: Tolerances,
) -> tuple[int, float]:
    """Replicas for a per-replica average-value target (``calcPlainMetricReplicas``).

    Returns the proposal and the current per-replica average.
    """
    target = _milli(target_average)
    if target <= 0:
        raise ValueError(f"target average value must be > 0, got {target_average}")
    dropped = groups.ignored | groups.unready
    metrics = {rid: _milli(v) for rid, v in values.items() if rid not in dropped}
    if not metrics:
        raise MetricUnavailable(
            "did not receive metrics for targeted replicas (they may be unready)"
        )
    usage = sum(metrics.values()) // len(metrics)
    usage_ratio = usage / target

    scale_up_with_unready = bool(groups.unready) and usage_ratio > 1.0
    if not scale_up_with_unready and not groups.missing:
        if tolerances.within(usage_ratio):
            return current, usage / 1000.0
        return math.ceil(usage_ratio * groups.ready_count), usage / 1000.0

    if groups.missing:
        if usage_ratio < 1.0:
            metrics.update({rid: target for rid in groups.missing})
        elif usage_ratio > 1.0:
            metrics.update({rid: 0 for rid in groups.missing})
    if scale_up_with_unready:
        metrics.update({rid: 0 for rid in groups.unready})

    new_ratio = (sum(metrics.values()) // len(metrics)) / target
    return _settle(current, usage_ratio, new_ratio, len(metrics), tolerances), usage / 1000.0


def tier_value_replicas(
    current: int,
    value: float,
    target_value: float,
    ready_count: int,
    tolerances: Tolerances,
) -> int:
    """Replicas for a tier-wide value target (External/Object ``Value``).

    From zero replicas the tolerance and the ready count are skipped, which is what lets
    an external metric scale a workload up from zero.
    """
    target = _milli(target_value)
    if target <= 0:
        raise ValueError(f"target value must be > 0, got {target_value}")
    usage_ratio = _milli(value) / target
    if current == 0:
        return math.ceil(usage_ratio)
    if tolerances.within(usage_ratio):
        return current
    return math.ceil(usage_ratio * ready_count)


def tier_average_value_replicas(
    status_replicas: int,
    value: float,
    target_per_replica: float,
    tolerances: Tolerances,
) -> int:
    """Replicas for a tier-wide total with a per-replica target (External ``AverageValue``).

    The proposal is simply ``ceil(total / target)``, unless the existing replicas are
    already within tolerance of it.
    """
    target = _milli(target_per_replica)
    if target <= 0:
        raise ValueError(f"target average value must be > 0, got {target_per_replica}")
    usage = _milli(value)
    if status_replicas > 0 and tolerances.within(usage / (target * status_replicas)):
        return status_replicas
    return math.ceil(usage / target)
