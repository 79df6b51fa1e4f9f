"""Per-stage autoscaling: stage signals reach the policies, and the bottleneck stage scales."""

from __future__ import annotations

from strata.autoscale.registry import build_policy
from strata.autoscale.types import TierState
from strata.load import LoadReport
from strata.stages.scaling import (
    STAGE_BUSY,
    STAGE_QUEUE,
    bottleneck,
    stage_autoscaling,
    stage_sample,
)


def body(stage: str, busy: float, queued: int) -> dict:
    rep = LoadReport(model="m", running=4, waiting=queued, waiting_prompt_tokens=0,
                     free_kv_blocks=50, total_kv_blocks=100, block_size=16, max_num_seqs=0,
                     max_num_batched_tokens=0, prefix_hit_rate=0.0, prompt_tokens_per_s=0.0,
                     generation_tokens_per_s=10.0, decode_step_s=0.05, prefill_token_s=0.0,
                     stage=stage)
    return {**rep.to_dict(), "busy_ratio": busy, "queued_frames": queued}


def tier(stage: str, busy: list[float], queued: int = 0) -> TierState:
    samples = tuple(
        stage_sample(f"{stage}-{i}", body(stage, b, queued), started_at=0.0)
        for i, b in enumerate(busy)
    )
    return TierState(tier=stage, current_replicas=len(busy), replicas=samples)


def test_sample_carries_report_and_stage_signals() -> None:
    s = stage_sample("r", body("15:30", 0.9, 3), started_at=1.0)
    assert s.report is not None and s.report.stage == "15:30" and s.report.kv_usage == 0.5
    assert s.metric(STAGE_BUSY) == 0.9 and s.metric(STAGE_QUEUE) == 3.0
    missing = stage_sample("r", None, started_at=1.0, ready_changed_at=1.0)
    assert missing.report is None and missing.metric(STAGE_BUSY) is None


def test_hpa_on_busy_ratio_scales_the_bottleneck_stage_only() -> None:
    states = {"0:15": tier("0:15", [0.45]), "15:30": tier("15:30", [0.97], queued=2)}
    assert bottleneck(states) == "15:30"
    cfg = stage_autoscaling(max_replicas=3)
    up = build_policy(cfg).decide(states["15:30"], now=100.0)
    steady = build_policy(cfg).decide(states["0:15"], now=100.0)
    assert up.desired == 2 and steady.desired == 1
    # Two replicas sharing the load at 60 % each: no further change.
    assert build_policy(cfg).decide(tier("15:30", [0.6, 0.62]), now=100.0).desired == 2
