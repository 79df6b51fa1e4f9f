"""The HPA policy end to end: metrics, invalid metrics, bounds, behaviour and zero."""

from __future__ import annotations

import pytest

from strata.autoscale.hpa import HpaConfig, HpaMetric, HpaPolicy
from strata.autoscale.types import TierState
from tests.autoscale.autoscale_helpers import kv_tier, replica


def hpa(**kw: object) -> HpaPolicy:
    return HpaPolicy(HpaConfig.model_validate({"max_replicas": 20, **kw}))


def waiting_tier(current: int, kvs: list[float], waits: list[int], **kw: object) -> TierState:
    reps = tuple(
        replica(f"r{i}", kv=kv, waiting=w) for i, (kv, w) in enumerate(zip(kvs, waits, strict=True))
    )
    return TierState(tier="t", current_replicas=current, replicas=reps, **kw)  # type: ignore[arg-type]


def test_default_metric_is_kv_usage_at_80_percent() -> None:
    cfg = HpaConfig(max_replicas=5)
    assert cfg.min_replicas == 1 and cfg.behavior is None
    assert cfg.metrics == (HpaMetric(name="kv_usage", type="Utilization", average_utilization=80),)
    d = HpaPolicy(cfg).decide(kv_tier(2, [1.0, 1.0]), 0.0)
    assert d.desired == 3 and d.metrics["kv_usage"] == 100.0  # ceil(1.25 * 2)
    assert d.policy == "hpa" and "kv_usage above target" in d.reason


def test_largest_proposal_over_several_metrics_wins() -> None:
    p = hpa(
        metrics=[
            {"name": "kv_usage", "type": "Utilization", "averageUtilization": 50},
            {"name": "waiting", "type": "AverageValue", "averageValue": 2},
        ]
    )
    # kv 60 % vs 50 %: ceil(1.2 * 2) = 3; waiting avg 5 vs 2: ceil(2.5 * 2) = 5.
    d = p.decide(waiting_tier(2, [0.6, 0.6], [5, 5]), 0.0)
    assert d.metrics["kv_usage.proposal"] == 3 and d.metrics["waiting.proposal"] == 5
    assert d.desired == 4  # legacy scale-up limit: max(2 * 2, 4)
    assert "waiting above target" in d.reason and "ScaleUpLimit" in d.reason


def test_invalid_metric_blocks_scale_down_but_not_scale_up() -> None:
    metrics = [
        {"name": "kv_usage", "type": "Utilization", "averageUtilization": 50},
        {"name": "custom_gpu", "type": "AverageValue", "averageValue": 1},  # never reported
    ]
    down = hpa(metrics=metrics).decide(kv_tier(4, [0.1] * 4), 1000.0)
    assert down.desired == 4 and "FailedComputeMetricsReplicas" in down.reason
    up = hpa(metrics=metrics).decide(kv_tier(4, [0.9] * 4), 0.0)
    assert up.desired == 8 and "invalid metrics (1 of 2)" in up.reason


def test_all_metrics_invalid_means_no_change() -> None:
    d = hpa().decide(kv_tier(3, [None, None, None]), 0.0)
    assert d.desired == 3 and "FailedComputeMetricsReplicas" in d.reason


def test_custom_metric_from_extra_values() -> None:
    p = hpa(metrics=[{"name": "custom_gpu", "type": "AverageValue", "averageValue": 0.5}])
    reps = tuple(replica(f"r{i}", kv=0.0, extra={"custom_gpu": 1.0}) for i in range(2))
    d = p.decide(TierState(tier="t", current_replicas=2, replicas=reps), 0.0)
    assert d.desired == 4


def test_current_outside_bounds_is_corrected_at_once() -> None:
    assert hpa(max_replicas=3).decide(kv_tier(5, [0.8] * 5), 0.0).desired == 3
    assert hpa(min_replicas=4).decide(kv_tier(2, [0.0] * 2), 0.0).desired == 4


def test_zero_replicas_with_min_above_zero_disables_scaling() -> None:
    d = hpa().decide(TierState(tier="t", current_replicas=0, pending_requests=5), 0.0)
    assert d.desired == 0 and "ScalingDisabled" in d.reason


def test_scale_down_waits_for_the_stabilization_window() -> None:
    p = hpa()
    assert p.decide(kv_tier(4, [0.1] * 4), 0.0).desired == 4  # initial recommendation 4
    assert p.decide(kv_tier(4, [0.1] * 4), 299.0).desired == 4
    d = p.decide(kv_tier(4, [0.1] * 4), 300.5)
    assert d.desired == 1 and d.reason.startswith("all metrics below target")


def test_behavior_rate_limits_use_history_of_decisions() -> None:
    p = hpa(behavior={"scaleUp": {"policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]}})
    assert p.decide(kv_tier(2, [1.0, 1.0]), 0.0).desired == 3  # 125 % -> 3 (within +2)
    d = p.decide(kv_tier(3, [1.0] * 3), 10.0)  # wants 4; start 2 -> limit 4
    assert d.desired == 4
    d = p.decide(kv_tier(4, [1.0] * 4), 20.0)  # wants 5; 2 pods already added this minute
    assert d.desired == 4 and "ScaleUpLimit" in d.reason
    assert p.decide(kv_tier(4, [1.0] * 4), 60.5).desired == 5


def test_tolerance_in_behavior_overrides_the_default() -> None:
    tight = hpa(behavior={"scaleUp": {"tolerance": 0}})
    # 84 % vs 80 %: within the default 10 %, outside a zero scale-up tolerance.
    assert hpa().decide(kv_tier(10, [0.84] * 10), 0.0).desired == 10
    assert tight.decide(kv_tier(10, [0.84] * 10), 0.0).desired == 11


def test_tier_value_metric_scales_up_from_zero() -> None:
    p = hpa(
        min_replicas=0,
        metrics=[{"name": "arrival_rate_rps", "source": "tier", "type": "Value", "value": 10}],
    )
    d = p.decide(TierState(tier="t", current_replicas=0, arrival_rate_rps=35.0), 0.0)
    assert d.desired == 4 and d.metrics["arrival_rate_rps"] == 35.0


def test_activator_brings_a_zero_tier_back_with_one_replica() -> None:
    p = hpa(min_replicas=0)  # per-replica metric: nothing to measure at zero
    d = p.decide(TierState(tier="t", current_replicas=0, pending_requests=3), 0.0)
    assert d.desired == 1 and "activator" in d.reason
    assert hpa(min_replicas=0).decide(TierState(tier="t", current_replicas=0), 0.0).desired == 0


def test_scale_to_zero_only_after_idle_grace() -> None:
    p = hpa(
        min_replicas=0,
        behavior={"scaleDown": {"stabilizationWindowSeconds": 0}},
        scale_to_zero_grace_s=30,
    )
    idle = kv_tier(1, [0.0], last_request_at=0.0)
    d = p.decide(idle, 1.0)
    assert d.desired == 1 and "keeping one replica" in d.reason
    assert p.decide(idle, 20.0).desired == 1
    d = p.decide(idle, 31.5)
    assert d.desired == 0 and "scaling to zero" in d.reason


def test_a_request_restarts_the_idle_wait() -> None:
    p = hpa(min_replicas=0, behavior={"scaleDown": {"stabilizationWindowSeconds": 0}})
    assert p.decide(kv_tier(1, [0.0]), 0.0).desired == 1
    assert p.decide(kv_tier(1, [0.0], last_request_at=25.0), 29.0).desired == 1
    assert p.decide(kv_tier(1, [0.0], last_request_at=25.0), 40.0).desired == 1
    assert p.decide(kv_tier(1, [0.0], last_request_at=25.0), 55.0).desired == 0


def test_tier_average_value_metric_uses_live_replicas() -> None:
    p = hpa(
        metrics=[
            {"name": "concurrency", "source": "tier", "type": "AverageValue", "averageValue": 4}
        ]
    )
    state = kv_tier(3, [0.0] * 3, in_flight_requests=20, pending_requests=2)
    assert p.decide(state, 0.0).desired == 6  # ceil(22 / 4)


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ({"name": "kv_usage", "type": "Value", "value": 1}, "not valid for a replica"),
        ({"name": "kv_usage", "type": "Utilization"}, "set average_utilization"),
        ({"name": "nope"}, "not a replica metric"),
        ({"name": "arrival_rate_rps", "source": "tier", "type": "Utilization"}, "not valid"),
    ],
)
def test_bad_metric_specs_fail_fast(metric: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HpaConfig.model_validate({"max_replicas": 3, "metrics": [metric]})


def test_max_replicas_is_required_like_kubernetes() -> None:
    with pytest.raises(ValueError, match="max_replicas"):
        HpaConfig.model_validate({})
