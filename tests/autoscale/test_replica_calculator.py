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
