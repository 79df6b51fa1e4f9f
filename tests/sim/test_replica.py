"""Simulated replica: the real scheduler's semantics, and skipped decode runs change nothing."""

from __future__ import annotations

import pytest

from strata.load_meter import ewma_after
from strata.sim.cluster import SimCluster
from strata.sim.perf_model import ReplicaModel, StepFeatures
from strata.sim.types import EngineSettings, SimRequest
from tests.sim.conftest import make_setup, random_requests


def outcomes(cluster: SimCluster) -> list[tuple[int, str, float, float, int, str]]:
    return [(r.req_id, r.status, r.first_token_s, r.finish_s, r.preemptions, r.replica)
            for r in cluster.requests]


@pytest.mark.parametrize("policy", ["round_robin", "resource_match", "least_kv"])
@pytest.mark.parametrize("blocks", [400, 120])  # 120 blocks: KV pressure and preemptions
def test_skipping_decode_runs_gives_identical_results(a100_13b: ReplicaModel, policy: str,
                                                       blocks: int) -> None:
    engine = EngineSettings(num_blocks=blocks, block_size=16, max_num_seqs=12,
                            max_num_batched_tokens=512, max_model_len=4096)
    runs = []
    for ff in (True, False):
        setup = make_setup(a100_13b, engine=engine, initial_units=2, routing_policy=policy,
                           fast_forward=ff, poll_interval_s=0.2)
        cluster = SimCluster(setup)
        stats = cluster.run(random_requests(120, rate=6.0, max_prompt=900, max_output=120))
        runs.append((cluster, stats))
    (fast, fs), (slow, ss) = runs
    a, b = outcomes(fast), outcomes(slow)
    assert [x[:2] + x[4:] for x in a] == [x[:2] + x[4:] for x in b]
    for x, y in zip(a, b, strict=True):
        assert x[2] == pytest.approx(y[2], abs=1e-6) and x[3] == pytest.approx(y[3], abs=1e-6)
    assert fs.steps == ss.steps and fs.busy_gpu_s == pytest.approx(ss.busy_gpu_s, rel=1e-9)
    assert fs.real_steps < ss.real_steps  # the runs were skipped, not stepped
    if blocks == 120:
        assert any(r.preemptions for r in fast.requests)


def test_one_request_takes_its_prefill_then_one_step_per_token(a100_13b: ReplicaModel) -> None:
    cluster = SimCluster(make_setup(a100_13b, initial_units=1))
    req = SimRequest(0, 1.0, prompt_tokens=700, output_tokens=5)
    cluster.run([req])
    cost = a100_13b.cost
    chunk1 = cost.step_s(StepFeatures(prefill_tokens=512, prefill_pairs=512 * 513 / 2))
    chunk2 = cost.step_s(StepFeatures(prefill_tokens=188, prefill_pairs=188 * 512 + 188 * 189 / 2,
                                      prefill_ctx=512, sampled=1))
    assert req.first_token_s == pytest.approx(1.0 + chunk1 + chunk2)
    decodes = sum(cost.step_s(StepFeatures(decodes=1, decode_ctx=700 + i, sampled=1,
                                           decode_max_ctx=700 + i)) for i in range(1, 5))
    assert req.finish_s == pytest.approx(req.first_token_s + decodes)
    assert req.status == "ok"


def test_load_report_during_a_skipped_run_matches_stepping(a100_13b: ReplicaModel) -> None:
    reports = []
    for ff in (True, False):
        cluster = SimCluster(make_setup(a100_13b, initial_units=1, fast_forward=ff))
        reqs = [SimRequest(i, 0.0, 100 + 10 * i, 200) for i in range(6)]
        cluster.loop.at(3.0, lambda c=cluster: reports.append(
            c.units[0].members[0].load_report(c.loop.now)))
        cluster.run(reqs)
    fast, slow = reports
    assert fast.running == slow.running == 6
    assert fast.free_kv_blocks == slow.free_kv_blocks
    assert fast.decode_step_s == pytest.approx(slow.decode_step_s, rel=1e-9)
    assert fast.generation_tokens_per_s == pytest.approx(slow.generation_tokens_per_s, rel=1e-9)


def test_closed_form_ewma_equals_repeated_updates() -> None:
    for d0 in (0.0, 0.03):
        d = d0
        for i in range(37):
            v = 0.02 + 0.0001 * i
            d = v if d == 0 else 0.8 * d + 0.2 * v
        assert ewma_after(d0, 0.02, 0.0001, 37) == pytest.approx(d, rel=1e-12)
    assert ewma_after(0.5, 0.1, 0.0, 0) == 0.5


def test_incremental_waiting_tokens_match_the_scheduler(a100_13b: ReplicaModel) -> None:
    engine = EngineSettings(num_blocks=150, block_size=16, max_num_seqs=8,
                            max_num_batched_tokens=256, max_model_len=4096)
    cluster = SimCluster(make_setup(a100_13b, engine=engine, initial_units=1))
    checks = []

    def check() -> None:
        rep = cluster.units[0].members[0]
        checks.append((rep.waiting_prompt_tokens(), rep.scheduler.waiting_prompt_tokens()))
        if cluster.loop.now < 60:
            cluster.loop.after(0.137, check)

    cluster.loop.at(0.0, check)
    cluster.run(random_requests(150, rate=5.0, max_prompt=1200, max_output=100))
    assert len(checks) > 400 and max(a for a, _ in checks) > 10_000
    assert all(a == b for a, b in checks)
    assert any(r.preemptions for r in cluster.requests)
