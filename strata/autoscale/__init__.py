"""Autoscaling: pure policies (hpa, kpa, llm, predictive) that map a tier's state to a decision.

A policy holds only its config and its own history and is advanced only by
``decide(state, now)``; the control loop and the simulator own the clock and actuation.
"""

from strata.autoscale.hpa import HpaConfig, HpaMetric, HpaPolicy
from strata.autoscale.kpa import KpaConfig, KpaPolicy
from strata.autoscale.llm import LlmConfig, LlmPolicy
from strata.autoscale.predictive import PredictiveConfig, PredictivePolicy
from strata.autoscale.registry import (
    POLICIES,
    AutoscalingConfig,
    build_policy,
    parse_config,
    policy_names,
)
from strata.autoscale.types import AutoscalingPolicy, ReplicaSample, ScaleDecision, TierState

__all__ = [
    "POLICIES",
    "AutoscalingConfig",
    "AutoscalingPolicy",
    "HpaConfig",
    "HpaMetric",
    "HpaPolicy",
    "KpaConfig",
    "KpaPolicy",
    "LlmConfig",
    "LlmPolicy",
    "PredictiveConfig",
    "PredictivePolicy",
    "ReplicaSample",
    "ScaleDecision",
    "TierState",
    "build_policy",
    "parse_config",
    "policy_names",
]
