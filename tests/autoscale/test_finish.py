"""The finish every policy shares: bounds, the behaviour step, the zero gate, the decision."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from strata.autoscale.finish import Proposal, ScaleFinish
from strata.autoscale.hpa import HpaConfig
from strata.autoscale.kpa import KpaConfig
from strata.autoscale.llm import LlmConfig
from strata.autoscale.types import TierState
from tests.autoscale.autoscale_helpers import replica


def tier(current: int, ready: int | None = None, **kw: object) -> TierState:
    n = current if ready is None else ready
    reps = tuple(replica(f"r{i}", kv=0.5) for i in range(n))
    return TierState(tier="t", current_replicas=current, replicas=reps, **kw)  # type: ignore[arg-type]


def test_a_pending_proposal_is_not_computed_when_the_count_is_out_of_range() -> None:
    finish = ScaleFinish.with_behavior(
        HpaConfig(min_replicas=2, max_replicas=4, downscale_stabilization_s=0))
    asked: list[int] = []

    def propose() -> Proposal:
        asked.append(1)
        return Proposal(3, ["asked"], {"signal": 1.0})

    d = finish.decide("p", tier(6), 0.0, propose)
    assert (d.desired, asked) == (4, [])
    assert d.reason == "current number of replicas above max_replicas"
    assert list(d.metrics) == ["ready_replicas", "desired"]
    d = finish.decide("p", tier(3), 1.0, propose)
    assert asked == [1] and d.desired == 3 and "asked" in d.reason
    assert list(d.metrics) == ["ready_replicas", "signal", "proposal", "stabilized", "desired"]


def test_a_ready_proposal_is_reported_even_out_of_range() -> None:
    finish = ScaleFinish.with_behavior(LlmConfig(min_replicas=2, max_replicas=4))
    d = finish.decide("p", tier(1), 0.0, Proposal(9, ["seen"], {"signal": 2.0}))
    assert d.desired == 2
    assert d.reason == "seen; current number of replicas below min_replicas"
    assert list(d.metrics) == ["signal", "ready_replicas", "desired"]


def test_no_proposal_skips_or_feeds_the_behaviour_step() -> None:
    cfg = HpaConfig(max_replicas=8)
    skip = ScaleFinish.with_behavior(cfg)
    d = skip.decide("p", tier(3), 0.0, Proposal(None, ["FailedComputeMetricsReplicas: x"]))
    assert d.desired == 3 and "proposal" not in d.metrics
    assert d.reason == "FailedComputeMetricsReplicas: x"
    hold = ScaleFinish.with_behavior(cfg, hold_reason="holding")
    d = hold.decide("p", tier(3), 0.0, Proposal(None))
    assert d.desired == 3 and d.metrics["proposal"] == 3.0 and d.reason == "holding"


def test_zero_current_is_left_alone_only_where_scaling_is_disabled_at_zero() -> None:
    cfg = HpaConfig(min_replicas=1, max_replicas=8)
    d = ScaleFinish.with_behavior(cfg, disabled_at_zero=True).decide(
        "p", tier(0), 0.0, Proposal(5))
    assert d.desired == 0 and d.reason.startswith("ScalingDisabled")
    d = ScaleFinish.with_behavior(cfg).decide("p", tier(0), 0.0, Proposal(5))
    assert d.desired == 1 and d.reason == "current number of replicas below min_replicas"


def test_without_a_behaviour_step_the_proposal_is_clamped() -> None:
    finish = ScaleFinish(KpaConfig(min_replicas=1, max_replicas=3))
    d = finish.decide("kpa", tier(2), 0.0, Proposal(7, ["stable"]))
    assert d.desired == 3 and d.reason == "stable; bounded to [1, 3]"
    d = ScaleFinish(KpaConfig(min_replicas=2)).decide("kpa", tier(2), 0.0, Proposal(40))
    assert d.desired == 40 and d.reason == ""
    with pytest.raises(ValueError, match="no tolerances"):
        _ = finish.tolerances


def test_an_unbounded_finish_activates_a_tier_at_zero() -> None:
    finish = ScaleFinish(KpaConfig())  # Knative: min 0, max unbounded
    d = finish.decide("kpa", tier(0, pending_requests=3), 0.0, Proposal(0))
    assert d.desired == 1 and "activator holds 3 request(s)" in d.reason


@pytest.mark.parametrize("config", [HpaConfig, LlmConfig, KpaConfig])
def test_every_config_checks_its_bounds_once(config: type[HpaConfig]) -> None:
    with pytest.raises(ValidationError, match=r"min_replicas \(5\) must be <= max_replicas \(2\)"):
        config.model_validate({"min_replicas": 5, "max_replicas": 2})
