"""Builders for load reports, replica samples and tier states used by the autoscale tests."""

from __future__ import annotations

from strata.autoscale.types import ReplicaSample, TierState
from strata.load import LoadReport


def report(
    *,
    kv_usage: float = 0.0,
    running: int = 0,
    waiting: int = 0,
    max_num_seqs: int = 64,
    prompt_tps: float = 0.0,
    gen_tps: float = 0.0,
    ready: bool = True,
    draining: bool = False,
) -> LoadReport:
    """A LoadReport whose kv_usage is exactly ``kv_usage`` (10,000 blocks)."""
    total = 10_000
    return LoadReport(
        model="m",
        running=running,
        waiting=waiting,
        waiting_prompt_tokens=0,
        free_kv_blocks=total - int(round(kv_usage * total)),
        total_kv_blocks=total,
        block_size=16,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=2048,
        prefix_hit_rate=0.0,
        prompt_tokens_per_s=prompt_tps,
        generation_tokens_per_s=gen_tps,
        decode_step_s=0.02,
        prefill_token_s=0.0001,
        ready=ready,
        draining=draining,
    )


def replica(
    rid: str,
    *,
    kv: float | None = None,
    waiting: int = 0,
    running: int = 0,
    ready: bool = True,
    started_at: float = -1000.0,
    ready_changed_at: float | None = None,
    terminating: bool = False,
    extra: dict[str, float] | None = None,
    prompt_tps: float = 0.0,
    gen_tps: float = 0.0,
    max_num_seqs: int = 64,
) -> ReplicaSample:
    """A replica; ``kv=None`` means its load report is missing."""
    rep = None
    if kv is not None:
        rep = report(
            kv_usage=kv,
            waiting=waiting,
            running=running,
            prompt_tps=prompt_tps,
            gen_tps=gen_tps,
            max_num_seqs=max_num_seqs,
        )
    if ready and ready_changed_at is None:
        ready_changed_at = started_at
    return ReplicaSample(
        replica_id=rid,
        started_at=started_at,
        ready=ready,
        ready_changed_at=ready_changed_at,
        terminating=terminating,
        report=rep,
        extra=extra or {},
    )


def kv_tier(current: int, kvs: list[float | None], **kw: object) -> TierState:
    """A tier of ready replicas with the given KV usages (None: missing report)."""
    reps = tuple(replica(f"r{i}", kv=kv) for i, kv in enumerate(kvs))
    return TierState(tier="t", current_replicas=current, replicas=reps, **kw)  # type: ignore[arg-type]
