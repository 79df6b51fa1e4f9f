"""Kubernetes' per-metric replica calculation, case by case from its documented semantics."""

from __future__ import annotations

import pytest

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
from tests.autoscale.autoscale_helpers import replica

TOL = Tolerances()


def util(current: int, target: int, values: dict[str, float], reps=None, now: float = 0.0):
    reps = reps or [replica(rid, kv=0.0) for rid in values]
    groups = group_replicas(reps, values, now=now)
    return utilization_replicas(current, target, values, groups, TOL)


def test_scale_up_is_ceil_of_ratio_times_ready() -> None:
    # 30 %, 50 %, 70 % of capacity against a 30 % target: 50 / 30 * 3 = 5.
    assert util(3, 30, {"a": 0.3, "b": 0.5, "c": 0.7}) == (5, 50)


def test_scale_down() -> None:
    # utilization int((100+300+500+250+250)/5 * 100 / 1000) = 28 %; 28 / 50 * 5 = 2.8 -> 3
    values = {"a": 0.1, "b": 0.3, "c": 0.5, "d": 0.25, "e": 0.25}
    assert util(5, 50, values) == (3, 28)


@pytest.mark.parametrize(
    ("kv", "expected"),
    [
        (0.55, 4),  # 55 / 50 = 1.1: exactly at the upper tolerance bound -> no change
        (0.559, 4),  # whole-percent truncation: still 55 %
        (0.56, 5),  # 1.12 * 4 = 4.48 -> 5
        (0.45, 4),  # 0.9: exactly at the lower bound -> no change
        (0.44, 4),  # 0.88 * 4 = 3.52 -> 4: outside tolerance, yet rounds back to 4
        (0.40, 4),  # 0.8 * 4 = 3.2 -> 4
        (0.37, 3),  # 0.74 * 4 = 2.96 -> 3
    ],
)
def test_tolerance_boundaries(kv: float, expected: int) -> None:
    values = {f"r{i}": kv for i in range(4)}
    assert util(4, 50, values)[0] == expected


def test_average_value_tolerance_boundary() -> None:
    reps = [replica(f"r{i}", kv=0.0) for i in range(4)]

    def avg(v: float) -> int:
        values = {r.replica_id: v for r in reps}
        groups = group_replicas(reps, values, now=0.0)
        return average_value_replicas(4, 10.0, values, groups, TOL)[0]

    assert avg(11.0) == 4  # 1.1: within
    assert avg(11.01) == 5  # 1.101 * 4 = 4.404 -> 5
    assert avg(9.0) == 4  # 0.9: within
    assert avg(5.0) == 2


def test_configurable_tolerances_per_direction() -> None:
    # KEP-4951 example: 5 % on scale-down, none on scale-up.
    tol = Tolerances(scale_down=0.05, scale_up=0.0)
    assert tol.within(1.0) and not tol.within(1.01)
    assert tol.within(0.96) and not tol.within(0.94)
    reps = [replica(f"r{i}", kv=0.0) for i in range(10)]
    values = {r.replica_id: 0.505 for r in reps}  # 50 % after truncation: ratio 1.0
    groups = group_replicas(reps, values, now=0.0)
    assert utilization_replicas(10, 50, values, groups, tol)[0] == 10
    values = {r.replica_id: 0.51 for r in reps}  # 51 %: 1.02 -> 10.2 -> 11
    assert utilization_replicas(10, 50, values, groups, tol)[0] == 11


def test_missing_metrics_on_scale_down_count_as_full_target() -> None:
    reps = [replica(f"r{i}", kv=0.1) for i in range(4)] + [replica("m", kv=None)]
    values = {r.replica_id: 0.1 for r in reps[:4]}
    groups = group_replicas(reps, values, now=0.0)
    assert groups.missing == {"m"}
    # 10 % vs 50 %: scale-down. The missing one counts as 100 %: (4*10 + 100) / 5 = 28 %,
    # 0.56 * 5 = 2.8 -> 3 (it would be 1 if the missing replica were ignored).
    assert utilization_replicas(5, 50, values, groups, TOL) == (3, 10)


def test_missing_metrics_fallback_is_the_target_when_above_100_percent() -> None:
    reps = [replica("a", kv=0.5), replica("b", kv=0.5), replica("m", kv=None)]
    values = {"a": 0.5, "b": 0.5}
    groups = group_replicas(reps, values, now=0.0)
    # Target 200 %: the missing replica counts as 200 %, giving (50+50+200)/3 = 100 %,
    # ratio 0.5 -> ceil(1.5) = 2 (with a 100 % fallback it would be 1).
    assert utilization_replicas(3, 200, values, groups, TOL)[0] == 2


def test_missing_metrics_on_scale_up_count_as_zero() -> None:
    reps = [replica("a", kv=0.9), replica("b", kv=0.9), replica("m", kv=None)]
    values = {"a": 0.9, "b": 0.9}
    groups = group_replicas(reps, values, now=0.0)
    # 90 % vs 50 %: scale up; missing as 0: 60 %, 1.2 * 3 = 3.6 -> 4
    assert utilization_replicas(3, 50, values, groups, TOL)[0] == 4


def test_missing_metrics_that_flip_direction_keep_current() -> None:
    reps = [replica("a", kv=0.6), replica("b", kv=0.6), replica("m1"), replica("m2")]
    values = {"a": 0.6, "b": 0.6}
    groups = group_replicas(reps, values, now=0.0)
    # 60 % vs 50 % says up; with the two missing at 0 the average is 30 %, which says down.
    assert utilization_replicas(4, 50, values, groups, TOL)[0] == 4


def test_missing_metrics_recheck_within_tolerance_keeps_current() -> None:
    reps = [replica("a", kv=1.9), replica("m")]
    values = {"a": 1.9}
    groups = group_replicas(reps, values, now=0.0)
    # 190 % vs 100 %: up; missing at 0 -> 95 %: within tolerance -> no change.
    assert utilization_replicas(2, 100, values, groups, TOL)[0] == 2


def test_unready_replicas_count_as_zero_on_scale_up() -> None:
    starting = replica("s", kv=0.3, ready=False, ready_changed_at=None)
    reps = [starting, replica("a", kv=0.5), replica("b", kv=0.7)]
    values = {"s": 0.3, "a": 0.5, "b": 0.7}
    groups = group_replicas(reps, values, now=0.0)
    assert groups.unready == {"s"} and groups.ready_count == 2
    # Ready: 60 % vs 30 % -> up, with the unready at 0: 40 %, 1.333 * 3 = 4.
    assert utilization_replicas(3, 30, values, groups, TOL) == (4, 60)


def test_unready_replicas_are_ignored_on_scale_down() -> None:
    starting = replica("s", kv=0.9, ready=False, ready_changed_at=None)
    reps = [starting, replica("a", kv=0.1), replica("b", kv=0.1)]
    values = {"s": 0.9, "a": 0.1, "b": 0.1}
    groups = group_replicas(reps, values, now=0.0)
    # Only ready replicas: 10 % vs 50 % -> ceil(0.2 * 2) = 1.
    assert utilization_replicas(3, 50, values, groups, TOL)[0] == 1


def test_unready_recheck_that_lands_in_tolerance_keeps_current() -> None:
    reps = [replica(f"s{i}", ready=False, ready_changed_at=None) for i in range(2)]
    reps += [replica("a", kv=0.8), replica("b", kv=0.8)]
    values = {"a": 0.8, "b": 0.8}
    groups = group_replicas(reps, values, now=0.0)
    # 80 % vs 40 % -> up; unready at 0: 40 % -> ratio 1.0 -> no change.
    assert utilization_replicas(4, 40, values, groups, TOL)[0] == 4


def test_terminating_replicas_are_ignored() -> None:
    reps = [replica("a", kv=0.5), replica("x", kv=0.0, terminating=True)]
    values = {"a": 0.5, "x": 0.0}
    groups = group_replicas(reps, values, now=0.0)
    assert groups.ignored == {"x"} and groups.ready_count == 1
    assert utilization_replicas(2, 25, values, groups, TOL)[0] == 2  # 50 / 25 * 1


def test_no_usable_metrics_is_unavailable() -> None:
    reps = [replica("s", kv=0.5, ready=False, ready_changed_at=None)]
    groups = group_replicas(reps, {"s": 0.5}, now=0.0)
    with pytest.raises(MetricUnavailable):
        utilization_replicas(1, 50, {"s": 0.5}, groups, TOL)


def test_warmup_sensitive_metric_follows_cpu_initialization_rules() -> None:
    rules = ReadinessRules(
        initialization_period_s=300, initial_readiness_delay_s=30, metric_window_s=15
    )
    now = 1000.0
    # Within the initialization period, ready for 5 s only: sample predates a full window.
    young = replica("young", kv=0.5, started_at=now - 60, ready_changed_at=now - 5)
    # Within the initialization period, ready for 20 s: counts.
    warm = replica("warm", kv=0.5, started_at=now - 60, ready_changed_at=now - 20)
    # Past the period, now unready but it was ready after the initial delay: counts.
    flapped = replica(
        "flapped", kv=0.5, ready=False, started_at=now - 900, ready_changed_at=now - 100
    )
    # Past the period, unready and its last transition was within the initial delay
    # (it never became ready): unready.
    never = replica("never", kv=0.5, ready=False, started_at=now - 900, ready_changed_at=now - 890)
    reps = [young, warm, flapped, never]
    values = {r.replica_id: 0.5 for r in reps}
    groups = group_replicas(reps, values, now=now, warmup_sensitive=True, rules=rules)
    assert groups.unready == {"young", "never"}
    assert groups.ready_count == 2
    # Without the CPU rules only never-ready replicas would be unready.
    plain = group_replicas(reps, values, now=now)
    assert plain.unready == frozenset() and plain.ready_count == 4


def test_tier_value_scales_from_zero_without_tolerance() -> None:
    assert tier_value_replicas(0, 35.0, 10.0, 0, TOL) == 4
    assert tier_value_replicas(0, 0.0, 10.0, 0, TOL) == 0
    assert tier_value_replicas(2, 21.0, 10.0, 2, TOL) == 5  # ratio 2.1 * 2 ready = 4.2


def test_tier_value_uses_ready_count_and_tolerance() -> None:
    # ratio 1.05 -> within -> current; ratio 1.5 with 2 ready -> 3.
    assert tier_value_replicas(4, 10.5, 10.0, 4, TOL) == 4
    assert tier_value_replicas(4, 15.0, 10.0, 2, TOL) == 3
    # Replicas exist but none is ready: Kubernetes multiplies by 0 ready pods.
    assert tier_value_replicas(4, 15.0, 10.0, 0, TOL) == 0


def test_tier_average_value_is_total_over_target() -> None:
    assert tier_average_value_replicas(3, 22.0, 4.0, TOL) == 6
    assert tier_average_value_replicas(5, 21.0, 4.0, TOL) == 5  # 21 / 20 = 1.05: within
    assert tier_average_value_replicas(0, 3.0, 2.0, TOL) == 2  # from zero
    assert tier_average_value_replicas(0, 0.0, 2.0, TOL) == 0


# -- Kubernetes' own cases (pkg/controller/podautoscaler/replica_calculator_test.go) -------
# Each pod there has two containers, each requesting ``requests[i]`` cores and using
# ``levels[i]`` millicores, so a pod's fraction is level / (1000 * request) and its
# capacity is its request. Replica ``p{i}`` is the test's pod i; a pod past the levels
# list is missing its metric.


def kube_case(current: int, target: int, requests: list[float], levels: list[int],
              unready: tuple[int, ...] = ()) -> tuple[int, int]:
    reps = []
    for i, _ in enumerate(requests):
        never_ready = i in unready
        reps.append(replica(f"p{i}", kv=0.0, ready=not never_ready,
                            ready_changed_at=None if never_ready else -1000.0))
    values = {f"p{i}": level / (1000 * requests[i]) for i, level in enumerate(levels)}
    capacities = {f"p{i}": r for i, r in enumerate(requests)}
    groups = group_replicas(reps, values, now=0.0)
    return utilization_replicas(current, target, values, groups, TOL, capacities)


def test_kube_missing_metrics_scale_down_target_over_100() -> None:
    # TestReplicaCalcMissingMetricsScaleDownTargetOver100: requests 1,1,2,2 cores; pod 0
    # unready, pod 3 missing. Utilization is (100+100) / (1000+2000) = 6 % (the plain
    # mean of 10 % and 5 % would be 7 %); the missing pod counts as 300 % of its 2 cores:
    # (100+100+6000) / 5000 = 124 %, 124/300 * 3 = 1.24 -> 2.
    assert kube_case(4, 300, [1.0, 1.0, 2.0, 2.0], [200, 100, 100], unready=(0,)) == (2, 6)


def test_kube_tolerance_with_unequal_requests() -> None:
    # TestReplicaCalcTolerance: requests 0.9, 1.0, 1.1; usage 1010, 1030, 1020 millicores
    # is 3060 / 3000 = 102 % of the summed requests: within tolerance.
    assert kube_case(3, 100, [0.9, 1.0, 1.1], [1010, 1030, 1020]) == (3, 102)


def test_kube_scale_up_and_down() -> None:
    # TestReplicaCalcScaleUp / TestReplicaCalcScaleDown with equal requests.
    assert kube_case(3, 30, [1.0] * 3, [300, 500, 700]) == (5, 50)
    assert kube_case(5, 50, [1.0] * 5, [100, 300, 500, 250, 250]) == (3, 28)


def test_kube_missing_metrics_cases() -> None:
    # TestReplicaCalcMissingMetrics: 2 of 4 report, (400+95)/2000 = 24 %, target 100 %:
    # missing pods at 100 %: (495 + 2000) / 4000 = 62 % -> ceil(0.62 * 4) = 3.
    assert kube_case(4, 100, [1.0] * 4, [400, 95]) == (3, 24)
    # TestReplicaCalcMissingMetricsUnreadyScaleDown: 4 -> 3 at 10 %.
    assert kube_case(4, 50, [1.0] * 4, [100, 100, 100], unready=(0,)) == (3, 10)
    # TestReplicaCalcMissingMetricsUnreadyScaleUp: 200 % -> 4.
    assert kube_case(3, 50, [1.0] * 3, [100, 2000], unready=(0,)) == (4, 200)


def test_kube_computed_tolerance_with_jittered_requests() -> None:
    # TestReplicaCalcComputedToleranceAlgImplementation: ten pods using 150m each with
    # requests of 300m +/- jitter (sum 3000m): 50 % utilization. Target 56 %
    # (1/(2*0.9) + .01) scales 10 -> ceil(50/56 * 10) = 9; target 55 % (+.004) stays.
    per_pod = 300
    jitter = [100, -100, 10, -10, 2, -2, 1, -1, 0, 0]
    requests = [(per_pod + j) / 1000 for j in jitter]
    levels = [150] * 10
    assert kube_case(10, 56, requests, levels) == (9, 50)
    assert kube_case(10, 55, requests, levels) == (10, 50)


def test_unequal_capacities_change_the_replica_count() -> None:
    # One large replica (4x) nearly idle, two small ones full: the plain mean says
    # (0.1 + 0.9 + 0.9) / 3 = 63 % (scale 3 -> 4 at a 50 % target); weighted by capacity
    # (0.4 + 0.9 + 0.9) / 6 = 36 % -> ceil(0.72 * 3) = 3.
    values = {"big": 0.1, "a": 0.9, "b": 0.9}
    reps = [replica(rid, kv=v) for rid, v in values.items()]
    groups = group_replicas(reps, values, now=0.0)
    assert utilization_replicas(3, 50, values, groups, TOL) == (4, 63)
    caps = {"big": 4.0, "a": 1.0, "b": 1.0}
    assert utilization_replicas(3, 50, values, groups, TOL, caps) == (3, 36)


def test_equal_capacities_of_any_size_match_unit_capacities() -> None:
    values = {"a": 0.1, "b": 0.3, "c": 0.5, "d": 0.25, "e": 0.25}
    reps = [replica(rid, kv=v) for rid, v in values.items()] + [replica("m")]
    groups = group_replicas(reps, values, now=0.0)
    plain = utilization_replicas(6, 50, values, groups, TOL)
    for size in (2.0, 3.0, 80.0):
        caps = {r.replica_id: size for r in reps}
        assert utilization_replicas(6, 50, values, groups, TOL, caps) == plain


def test_hpa_policy_weights_by_replica_capacity() -> None:
    from strata.autoscale.hpa import HpaConfig, HpaPolicy
    from strata.autoscale.types import ReplicaSample, TierState

    def state(big_capacity: float) -> TierState:
        reps = [replica("big", kv=0.1), replica("a", kv=0.9), replica("b", kv=0.9)]
        reps = [ReplicaSample(**{**{f: getattr(r, f) for f in r.__slots__},
                                 "capacity": big_capacity if r.replica_id == "big" else 1.0})
                for r in reps]
        return TierState(tier="t", current_replicas=3, replicas=tuple(reps))

    cfg = HpaConfig(max_replicas=10, downscale_stabilization_s=0,
                    metrics=[{"name": "kv_usage", "average_utilization": 50}])
    assert HpaPolicy(cfg).decide(state(1.0), 0.0).desired == 4
    assert HpaPolicy(cfg).decide(state(4.0), 0.0).desired == 3
