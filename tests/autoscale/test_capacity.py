"""Online per-replica capacity estimation from load reports."""

from __future__ import annotations

import random

import pytest

from strata.autoscale.capacity import CapacityEstimator
from tests.autoscale.autoscale_helpers import replica


def test_converges_on_saturated_reports() -> None:
    rng = random.Random(7)
    est = CapacityEstimator(alpha=0.2)
    true_capacity = 1200.0
    for _ in range(60):
        reps = [
            replica(
                f"r{i}",
                kv=0.5,
                waiting=3,  # queueing: throughput is the replica's limit
                prompt_tps=0.6 * true_capacity * rng.uniform(0.95, 1.05),
                gen_tps=0.4 * true_capacity * rng.uniform(0.95, 1.05),
            )
            for i in range(3)
        ]
        est.observe(reps)
    assert est.tokens_per_s == pytest.approx(true_capacity, rel=0.03)
    assert est.saturated_samples == 180


def test_unsaturated_reports_do_not_pull_the_estimate_down() -> None:
    est = CapacityEstimator(alpha=0.5)
    est.observe([replica("a", kv=0.5, waiting=2, gen_tps=1000.0)])
    assert est.tokens_per_s == 1000.0
    for _ in range(20):
        est.observe([replica("a", kv=0.1, waiting=0, gen_tps=100.0)])  # light load
    assert est.tokens_per_s == 1000.0
    est.observe([replica("a", kv=0.1, waiting=0, gen_tps=1400.0)])  # did more: raise
    assert est.tokens_per_s == pytest.approx(1200.0)


def test_unknown_until_saturated_unless_seeded() -> None:
    est = CapacityEstimator()
    est.observe([replica("a", kv=0.1, gen_tps=300.0)])
    assert est.tokens_per_s is None
    assert CapacityEstimator(initial_tokens_per_s=800.0).tokens_per_s == 800.0


@pytest.mark.parametrize(
    "kw",
    [
        {"kv": 0.95},  # KV cache nearly full
        {"kv": 0.2, "running": 8, "max_num_seqs": 8},  # batch full
        {"kv": 0.2, "waiting": 1},  # queue
    ],
)
def test_saturation_signals(kw: dict) -> None:
    est = CapacityEstimator()
    est.observe([replica("a", gen_tps=500.0, **kw)])
    assert est.tokens_per_s == 500.0


def test_new_replicas_inherit_and_the_estimate_survives_zero() -> None:
    est = CapacityEstimator(alpha=0.5)
    est.observe([replica("a", kv=0.5, waiting=1, gen_tps=1000.0)])
    est.observe([])  # tier scaled to zero
    assert est.tokens_per_s == 1000.0
    est.observe([replica("b", kv=0.5, waiting=1, gen_tps=800.0)])  # starts from 1000
    assert est.replica_tokens_per_s("b") == pytest.approx(900.0)
    assert est.replica_tokens_per_s("a") is None


def test_not_ready_and_terminating_replicas_are_not_measured() -> None:
    est = CapacityEstimator()
    est.observe(
        [
            replica("s", kv=0.5, waiting=3, gen_tps=50.0, ready=False, ready_changed_at=None),
            replica("x", kv=0.5, waiting=3, gen_tps=50.0, terminating=True),
        ]
    )
    assert est.tokens_per_s is None
