"""Autoscaling policies by name, with the pydantic model that validates each one's config.

The cluster file's ``autoscaling: {policy: hpa, ...}`` block is one ``AutoscalingConfig``
(a union discriminated by ``policy``); ``build_policy`` turns it into a fresh policy
object, one per tier, since a policy carries that tier's history.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError

from strata.autoscale.hpa import HpaConfig, HpaPolicy
from strata.autoscale.kpa import KpaConfig, KpaPolicy
from strata.autoscale.llm import LlmConfig, LlmPolicy
from strata.autoscale.predictive import PredictiveConfig, PredictivePolicy
from strata.autoscale.types import AutoscalingPolicy, ConfigModel

AutoscalingConfig = Annotated[
    HpaConfig | KpaConfig | LlmConfig | PredictiveConfig, Field(discriminator="policy")
]

POLICIES: dict[str, tuple[type[ConfigModel], type[Any]]] = {
    "hpa": (HpaConfig, HpaPolicy),
    "kpa": (KpaConfig, KpaPolicy),
    "llm": (LlmConfig, LlmPolicy),
    "predictive": (PredictiveConfig, PredictivePolicy),
}


def policy_names() -> list[str]:
    """The names accepted in ``autoscaling.policy``."""
    return sorted(POLICIES)


def parse_config(data: dict[str, Any]) -> HpaConfig | KpaConfig | LlmConfig | PredictiveConfig:
    """Validate an ``autoscaling`` block; errors name the offending field and the choices."""
    name = data.get("policy")
    if name not in POLICIES:
        raise ValueError(
            f"autoscaling.policy must be one of {', '.join(policy_names())}, got {name!r}"
        )
    config_cls, _ = POLICIES[name]
    try:
        return config_cls.model_validate(data)  # type: ignore[return-value]
    except ValidationError as err:
        problems = "; ".join(
            f"autoscaling.{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in err.errors(include_url=False)
        )
        raise ValueError(f"invalid autoscaling config for policy {name!r}: {problems}") from None


def build_policy(
    config: HpaConfig | KpaConfig | LlmConfig | PredictiveConfig | dict[str, Any],
) -> AutoscalingPolicy:
    """A fresh policy (empty history) for one tier, from a validated config or a raw dict."""
    if isinstance(config, dict):
        config = parse_config(config)
    _, policy_cls = POLICIES[config.policy]
    return policy_cls(config)
