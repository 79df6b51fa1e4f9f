"""Per-stage autoscaling: stage signals reach the policies, and the bottleneck stage scales."""

from __future__ import annotations

from strata.autoscale.registry import build_policy
from strata.autoscale.types import TierState
from strata.load import LoadReport
from strata.stages.scaling import (
    STAGE_BUSY,
    STAGE_QUEUE,
    BottleneckFirst,
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


class _Seen:
    """What `BottleneckFirst` reads: the tick's observed state of every stage tier."""

    def __init__(self, states: dict[str, TierState]) -> None:
        self.latest = states


def test_only_the_bottleneck_stage_may_grow_in_a_tick() -> None:
    states = {"stage-10-20": tier("stage-10-20", [0.9]),
              "stage-20-30": tier("stage-20-30", [0.99], queued=3)}
    seen = _Seen(states)
    group = list(states)
    cfg = stage_autoscaling(max_replicas=3, downscale_stabilization_s=0)
    gated = {t: BottleneckFirst(build_policy(cfg), t, group, seen) for t in group}  # type: ignore[arg-type]
    assert gated["stage-20-30"].name == "hpa"
    up = gated["stage-20-30"].decide(states["stage-20-30"], now=100.0)
    held = gated["stage-10-20"].decide(states["stage-10-20"], now=100.0)
    assert (up.current, up.desired) == (1, 2)
    assert (held.current, held.desired) == (1, 1) and "stage-20-30 is the bottleneck" in held.reason
    # Held inside the policy's finish, before it records anything: the decision's own
    # evidence says 1, not the vetoed 2.
    assert held.metrics["desired"] == 1.0 and held.metrics["proposal"] == 2.0
    # Scale-downs are never held: an idle stage shrinks while another is the bottleneck.
    idle = tier("stage-10-20", [0.05, 0.0])
    seen.latest = {**states, "stage-10-20": idle}
    shrink = BottleneckFirst(build_policy(cfg), "stage-10-20", group, seen)  # type: ignore[arg-type]
    shrink.decide(idle, now=100.0)  # the policy's first sight of the tier seeds its history
    down = shrink.decide(idle, now=101.0)
    assert (down.current, down.desired) == (2, 1)
