"""Policy names, config validation of the cluster file's autoscaling block, policy building."""

from __future__ import annotations

import pytest
import yaml

from strata.autoscale import (
    HpaConfig,
    HpaPolicy,
    KpaPolicy,
    LlmPolicy,
    PredictiveConfig,
    PredictivePolicy,
    build_policy,
    parse_config,
    policy_names,
)
from strata.autoscale.types import TierState


def test_names() -> None:
    assert policy_names() == ["hpa", "kpa", "llm", "predictive"]


@pytest.mark.parametrize(
    ("block", "cls"),
    [
        ({"policy": "hpa", "max_replicas": 4}, HpaPolicy),
        ({"policy": "kpa"}, KpaPolicy),
        ({"policy": "llm", "max_replicas": 4}, LlmPolicy),
        ({"policy": "predictive", "max_replicas": 4}, PredictivePolicy),
    ],
)
def test_each_policy_builds_from_a_dict_and_decides(block: dict, cls: type) -> None:
    policy = build_policy(block)
    assert isinstance(policy, cls) and policy.name == block["policy"]
    assert policy.recommended_tick_s > 0
    d = policy.decide(TierState(tier="t", current_replicas=1), 0.0)
    assert d.policy == block["policy"] and d.tier == "t" and d.at == 0.0


def test_kubernetes_style_yaml_validates() -> None:
    block = yaml.safe_load(
        """
        policy: hpa
        minReplicas: 2
        maxReplicas: 10
        metrics:
          - name: kv_usage
            type: Utilization
            averageUtilization: 70
          - name: arrival_rate_rps
            source: tier
            type: AverageValue
            averageValue: 5
        behavior:
          scaleDown:
            stabilizationWindowSeconds: 120
            selectPolicy: Min
            policies:
              - {type: Pods, value: 2, periodSeconds: 60}
              - {type: Percent, value: 10, periodSeconds: 60}
        """
    )
    cfg = parse_config(block)
    assert isinstance(cfg, HpaConfig)
    assert cfg.min_replicas == 2 and cfg.metrics[1].average_value == 5
    assert cfg.behavior is not None and cfg.behavior.scale_down is not None
    assert cfg.behavior.scale_down.select_policy == "Min"


def test_snake_case_is_accepted_too() -> None:
    cfg = parse_config({"policy": "predictive", "max_replicas": 3, "forecast_window_s": 120})
    assert isinstance(cfg, PredictiveConfig) and cfg.forecast_window_s == 120


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"policy": "vpa"}, "autoscaling.policy must be one of hpa, kpa, llm, predictive"),
        ({}, "autoscaling.policy must be one of"),
        ({"policy": "hpa"}, "autoscaling.max_replicas: Field required"),
        ({"policy": "kpa", "stable_windw_s": 60}, "autoscaling.stable_windw_s: Extra inputs"),
        ({"policy": "kpa", "stable_window_s": 1}, "autoscaling.stable_window_s"),
        ({"policy": "llm", "max_replicas": 2, "min_replicas": 3}, "min_replicas (3) must be <="),
    ],
)
def test_errors_name_the_field(block: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_config(block)
    assert message in str(err.value)


def test_every_tier_gets_its_own_history() -> None:
    cfg = parse_config({"policy": "kpa"})
    a, b = build_policy(cfg), build_policy(cfg)
    assert a is not b
