"""The LLM-aware policy: KV pressure, queues, SLOs, capacity, stabilization, zero."""

from __future__ import annotations

import pytest

from strata.autoscale.llm import LlmConfig, LlmPolicy
from strata.autoscale.types import TierState
from tests.autoscale.autoscale_helpers import kv_tier, replica


def llm(**kw: object) -> LlmPolicy:
    return LlmPolicy(LlmConfig.model_validate({"max_replicas": 20, **kw}))


def test_scales_up_on_kv_pressure() -> None:
    d = llm().decide(kv_tier(2, [0.95, 0.95]), 0.0)
    # 95 % vs 75 %: ceil(1.2667 * 2) = 3
    assert d.desired == 3 and d.metrics["kv.proposal"] == 3
    assert d.reason.startswith("kv signal drives 3")


def test_scales_up_on_waiting_requests_including_the_activators() -> None:
    reps = tuple(replica(f"r{i}", kv=0.3, waiting=5) for i in range(2))
    state = TierState(tier="t", current_replicas=2, replicas=reps, pending_requests=2)
    d = llm(queue_max_step=4).decide(state, 0.0)
    assert d.metrics["waiting"] == 12 and d.metrics["queue.proposal"] == 6
    assert d.desired == 6 and "queue signal" in d.reason


def test_queue_signal_is_capped_by_ready_replicas_while_others_start() -> None:
    # 2 ready with a backlog of 40, 4 more already starting: ceil(40 / 2) = 20 would
    # order replicas that cannot help yet; the proposal stays at 2 x ready = 4 <= current.
    reps = tuple(replica(f"r{i}", kv=0.5, waiting=20) for i in range(2))
    reps += tuple(replica(f"s{i}", ready=False, ready_changed_at=None) for i in range(4))
    d = llm().decide(TierState(tier="t", current_replicas=6, replicas=reps), 0.0)
    assert d.metrics["queue.proposal"] == 6 and d.desired == 6
    assert "capped" in d.reason


def test_ttft_slo_violation_scales_up_proportionally_capped() -> None:
    p = llm(ttft_slo_s=0.5)
    state = kv_tier(3, [0.3] * 3, ttft_s=tuple([0.2] * 5 + [1.5] * 5))
    d = p.decide(state, 0.0)
    assert d.metrics["ttft_p90_s"] == 1.5 and d.metrics["ttft_slo_ratio"] == 3.0
    assert d.metrics["ttft_attainment"] == 0.5
    assert d.metrics["ttft.proposal"] == 6  # ratio 3 capped at slo_max_step 2: 3 * 2
    assert d.desired == 6


def test_tpot_slo_violation() -> None:
    p = llm(tpot_slo_s=0.05)
    state = kv_tier(4, [0.3] * 4, tpot_s=tuple([0.07] * 20))
    assert p.decide(state, 0.0).desired == 6  # ceil(4 * 1.4)


def test_slo_needs_enough_observations() -> None:
    p = llm(ttft_slo_s=0.5)
    d = p.decide(kv_tier(2, [0.75, 0.75], ttft_s=(5.0,) * 9), 0.0)
    assert "ttft.proposal" not in d.metrics and d.desired == 2


def test_slo_close_to_its_limit_blocks_scale_down() -> None:
    idle = [0.05] * 4
    near = llm(ttft_slo_s=1.0, behavior={"scaleDown": {"stabilizationWindowSeconds": 0}})
    d = near.decide(kv_tier(4, idle, ttft_s=(0.9,) * 20), 0.0)
    assert d.metrics["ttft.proposal"] == 4 and d.desired == 4
    far = llm(ttft_slo_s=1.0, behavior={"scaleDown": {"stabilizationWindowSeconds": 0}})
    d = far.decide(kv_tier(4, idle, ttft_s=(0.3,) * 20), 0.0)
    assert "ttft.proposal" not in d.metrics and d.desired == 1


def test_capacity_signal_from_learned_throughput() -> None:
    p = llm()
    saturated = tuple(replica(f"r{i}", kv=0.5, waiting=1, gen_tps=1000.0) for i in range(2))
    # Demand: 10 req/s x 400 tokens = 4000 tokens/s over 1000 x 0.8 per replica -> 5.
    state = TierState(
        tier="t",
        current_replicas=2,
        replicas=saturated,
        arrival_rate_rps=10.0,
        mean_prompt_tokens=300.0,
        mean_output_tokens=100.0,
    )
    d = p.decide(state, 0.0)
    assert d.metrics["capacity_tokens_per_s"] == 1000.0
    assert d.metrics["demand_tokens_per_s"] == 4000.0
    assert d.metrics["capacity.proposal"] == 5 and d.desired == 5


def test_scale_down_is_stabilized_for_five_minutes_by_default() -> None:
    p = llm()
    assert p.decide(kv_tier(6, [0.05] * 6), 0.0).desired == 6
    assert p.decide(kv_tier(6, [0.05] * 6), 200.0).desired == 6
    d = p.decide(kv_tier(6, [0.05] * 6), 300.5)
    assert d.desired == 1 and d.metrics["proposal"] == 1


def test_scale_up_follows_the_default_rate_limits() -> None:
    reps = tuple(replica(f"r{i}", kv=0.5, waiting=40) for i in range(2))
    p = llm(queue_max_step=100)
    d = p.decide(TierState(tier="t", current_replicas=2, replicas=reps), 0.0)
    assert d.metrics["queue.proposal"] == 40 and d.desired == 6  # max(2 + 4, 2 * 2)
    assert "ScaleUpLimit" in d.reason


def test_zero_demand_proposes_zero_but_the_window_holds() -> None:
    state = TierState(tier="t", current_replicas=2)  # no replica visible, no demand
    d = llm().decide(state, 0.0)
    assert d.metrics["queue.proposal"] == 0 and "kv.proposal" not in d.metrics
    assert d.desired == 2 and "ScaleDownStabilized" in d.reason


def test_from_zero_and_back_to_zero() -> None:
    p = llm(min_replicas=0, behavior={"scaleDown": {"stabilizationWindowSeconds": 0}})
    d = p.decide(TierState(tier="t", current_replicas=0, pending_requests=5), 0.0)
    assert d.desired == 3  # queue signal: ceil(5 / 2), within the 4-pod scale-up limit
    idle = kv_tier(3, [0.0] * 3, last_request_at=10.0)
    assert p.decide(idle, 11.0).desired == 1  # idle, but not for the grace period yet
    assert p.decide(kv_tier(1, [0.0], last_request_at=10.0), 41.0).desired == 0


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="target_kv_usage"):
        LlmConfig.model_validate({"max_replicas": 3, "target_kv_usage": 1.5})
    with pytest.raises(ValueError, match="min_replicas"):
        LlmConfig.model_validate({"max_replicas": 3, "min_replicas": 4})
