"""The observed-state types: metric accessors, readiness mapping and derived tier facts."""

from __future__ import annotations

import pytest

from strata.autoscale.types import ReplicaSample, ScaleDecision, TierState, percentile
from tests.autoscale.autoscale_helpers import replica, report


def test_replica_metrics_come_from_the_load_report() -> None:
    r = ReplicaSample(
        replica_id="a",
        started_at=0.0,
        report=report(kv_usage=0.25, running=3, waiting=2, prompt_tps=100.0, gen_tps=50.0),
        in_flight=6,
        extra={"custom_x": 4.0},
    )
    assert r.metric("kv_usage") == 0.25
    assert r.metric("concurrency") == 5.0
    assert r.metric("tokens_per_s") == 150.0
    assert r.metric("in_flight") == 6.0
    assert r.metric("custom_x") == 4.0
    assert r.metric("nope") is None
    assert ReplicaSample(replica_id="b", started_at=0.0).metric("kv_usage") is None


def test_from_report_maps_readiness_and_draining() -> None:
    loading = ReplicaSample.from_report("a", report(ready=False), started_at=5.0)
    assert not loading.ready and not loading.has_been_ready
    draining = ReplicaSample.from_report("b", report(draining=True), started_at=0.0)
    assert draining.terminating and not draining.serving
    ready = ReplicaSample.from_report("c", report(), started_at=7.0)
    assert ready.ready and ready.ready_changed_at == 7.0  # ready since it started
    scrape_failed = ReplicaSample.from_report("d", None, started_at=0.0, ready_changed_at=3.0)
    assert scrape_failed.ready and scrape_failed.report is None


def test_tier_concurrency_prefers_the_gateway_count() -> None:
    reps = (replica("a", kv=0.1, running=3, waiting=1), replica("b", kv=0.1, running=2))
    derived = TierState(tier="t", current_replicas=2, replicas=reps, pending_requests=4)
    assert derived.dispatched_requests == 6 and derived.concurrency == 10
    told = TierState(tier="t", current_replicas=2, replicas=reps, in_flight_requests=9)
    assert told.concurrency == 9


def test_tier_metrics() -> None:
    s = TierState(
        tier="t",
        current_replicas=1,
        arrival_rate_rps=2.0,
        mean_prompt_tokens=100.0,
        mean_output_tokens=50.0,
        ttft_s=tuple(float(i) for i in range(1, 11)),
    )
    assert s.metric("arrival_tokens_per_s") == 300.0
    assert s.metric("ttft_p90_s") == 9.0
    assert s.metric("tpot_p90_s") is None


def test_percentile_nearest_rank() -> None:
    assert percentile([], 90) is None
    assert percentile([3.0], 90) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_invalid_state_fails_fast() -> None:
    with pytest.raises(ValueError, match="current_replicas"):
        TierState(tier="t", current_replicas=-1)
    with pytest.raises(ValueError, match="pending_requests"):
        TierState(tier="t", current_replicas=0, pending_requests=-2)


def test_decision_says_whether_it_scales() -> None:
    assert ScaleDecision("t", 2, 3, "hpa", "r").scales
    assert not ScaleDecision("t", 2, 2, "hpa", "r").scales


def test_decision_log_form() -> None:
    d = ScaleDecision("t", 2, 3, "llm", "kv signal", {"kv_usage": 0.9}, at=12.0)
    assert d.to_dict() == {
        "tier": "t",
        "at": 12.0,
        "policy": "llm",
        "current": 2,
        "desired": 3,
        "reason": "kv signal",
        "metrics": {"kv_usage": 0.9},
    }
