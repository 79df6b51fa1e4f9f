"""Simulated cluster: routing through the real policies, start-ups, drains, the autoscaler."""

from __future__ import annotations

import pytest

from strata.autoscale.hpa import HpaConfig
from strata.autoscale.llm import LlmConfig
from strata.sim.cluster import GPU_UTIL_METRIC, SimCluster
from strata.sim.perf_model import ReplicaModel
from strata.sim.types import SimRequest
from tests.sim.conftest import make_setup, random_requests


def test_round_robin_spreads_requests_evenly(a100_13b: ReplicaModel) -> None:
    cluster = SimCluster(make_setup(a100_13b, initial_units=3, routing_policy="round_robin"))
    cluster.run([SimRequest(i, 0.1 * i, 50, 5) for i in range(30)])
    counts = {u: sum(1 for r in cluster.requests if r.replica == u) for u in ("u0", "u1", "u2")}
    assert counts == {"u0": 10, "u1": 10, "u2": 10}
    assert all(r.status == "ok" for r in cluster.requests)


def test_static_units_are_provisioned_for_the_whole_run(a100_13b: ReplicaModel) -> None:
    cluster = SimCluster(make_setup(a100_13b, initial_units=2))
    stats = cluster.run(random_requests(40, rate=2.0))
    assert stats.provisioned_gpu_s == pytest.approx(2 * stats.end_s)
    assert 0 < stats.busy_gpu_s < stats.provisioned_gpu_s
    assert stats.units_started == 2 and not stats.startups


def test_scale_from_zero_holds_requests_until_a_unit_has_started(a100_13b: ReplicaModel
                                                                 ) -> None:
    auto = LlmConfig(min_replicas=0, max_replicas=2, scale_to_zero_grace_s=30.0)
    setup = make_setup(a100_13b, initial_units=0, autoscaling=auto, hold_timeout_s=600.0)
    cluster = SimCluster(setup)
    reqs = [SimRequest(0, 10.0, 100, 10), SimRequest(1, 11.0, 100, 10)]
    stats = cluster.run(reqs)
    startup = a100_13b.startup_s
    assert all(r.status == "ok" for r in reqs)
    # The first tick after the arrival asks for a replica; it serves after its start-up.
    assert reqs[0].dispatched_s >= 10.0 + startup
    assert reqs[0].dispatched_s == reqs[1].dispatched_s
    assert stats.startups == [pytest.approx(startup)]
    assert any(d.desired == 1 and d.current == 0 for d in cluster.decisions)


def test_held_requests_time_out(a100_13b: ReplicaModel) -> None:
    auto = LlmConfig(min_replicas=0, max_replicas=1)
    cluster = SimCluster(make_setup(a100_13b, initial_units=0, autoscaling=auto,
                                    hold_timeout_s=5.0))
    cluster.run([SimRequest(0, 1.0, 100, 10)])
    assert cluster.requests[0].status == "timeout"


def test_scale_down_drains_before_stopping(a100_13b: ReplicaModel) -> None:
    cluster = SimCluster(make_setup(a100_13b, initial_units=2, routing_policy="round_robin"))
    reqs = [SimRequest(0, 0.0, 100, 400), SimRequest(1, 0.0, 100, 400)]

    def shrink() -> None:
        cluster.scale_to(1, cluster.loop.now)

    cluster.loop.at(1.0, shrink)
    stats = cluster.run(reqs)
    assert all(r.status == "ok" for r in reqs)
    assert stats.units_stopped == 1
    drained = cluster._retired[0]
    assert drained.stopped_at == pytest.approx(max(r.finish_s for r in reqs
                                                  if r.replica == drained.unit_id))


def test_autoscaler_sees_gpu_utilisation_and_scales_up(a100_13b: ReplicaModel) -> None:
    hpa = HpaConfig(min_replicas=1, max_replicas=4, metrics=(
        {"name": GPU_UTIL_METRIC, "type": "Utilization", "average_utilization": 50},))
    setup = make_setup(a100_13b, initial_units=1, autoscaling=hpa,
                       routing_policy="round_robin")
    cluster = SimCluster(setup)
    stats = cluster.run(random_requests(300, rate=3.0, max_output=200))
    state = cluster.tier_state(cluster.loop.now)
    assert GPU_UTIL_METRIC in state.replicas[0].extra
    assert stats.units_started > 1
    assert any(d.desired > d.current for d in cluster.decisions)
    first_up = next(d for d in cluster.decisions if d.desired > d.current)
    ready = [s["ready"] for s in cluster.series if s["t_s"] < first_up.at + a100_13b.startup_s]
    assert max(ready) == 1  # nothing serves before its start-up is over


def test_results_are_deterministic(a100_13b: ReplicaModel) -> None:
    def once() -> list[tuple[float, float]]:
        auto = LlmConfig(min_replicas=1, max_replicas=3, ttft_slo_s=0.5, tpot_slo_s=0.05)
        cluster = SimCluster(make_setup(a100_13b, initial_units=1, autoscaling=auto))
        cluster.run(random_requests(150, rate=4.0))
        return [(r.first_token_s, r.finish_s) for r in cluster.requests]

    assert once() == once()


def test_requests_that_can_never_fit_are_rejected(a100_13b: ReplicaModel) -> None:
    cluster = SimCluster(make_setup(a100_13b, initial_units=1))
    cluster.run([SimRequest(0, 0.0, 4000, 200), SimRequest(1, 0.0, 10, 5)])
    assert [r.status for r in cluster.requests] == ["rejected", "ok"]


def test_a_unit_scaled_down_while_starting_stops_and_the_rest_serve(a100_13b: ReplicaModel
                                                                    ) -> None:
    # A scale-up then a scale-down before the new unit is ready (the KPA has no down-scale
    # window): the starting unit is drained first; it never joined the gateway.
    cluster = SimCluster(make_setup(a100_13b, initial_units=1, routing_policy="round_robin"))
    reqs = [SimRequest(i, 0.5 * i, 100, 20) for i in range(20)]
    cluster.loop.at(1.0, lambda: cluster.scale_to(2, cluster.loop.now))
    cluster.loop.at(2.0, lambda: cluster.scale_to(1, cluster.loop.now))
    stats = cluster.run(reqs)
    assert all(r.status == "ok" and r.replica == "u0" for r in reqs)
    assert stats.units_started == 2 and stats.units_stopped == 1
