"""Per-stage autoscaling: each downstream stage is a tier scaled on its own signals.

A stage replica's `/load` carries the one LoadReport (stage="a:b") plus two stage
signals: `busy_ratio` (compute seconds over wall time, recent window) and
`queued_frames` (micro-batches waiting for its compute). They enter the autoscaler as
the replica sample's custom metrics, so the existing policies scale a stage unchanged:
HPA on ``custom_stage_busy`` with a Utilization target adds replicas to the stage that
is the bottleneck (its busy ratio sits near 1 while the others wait on it) and removes
them where stages idle. `StageObserver` builds a stage tier's `TierState` for the
control loop (`strata.autoscale.loop`), like the engine tiers' observer does;
`pipeline_policies` and `PipelineObservers` are what a loop runs for a pipeline (the
strata controller on Kubernetes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from strata.autoscale.types import AutoscalingPolicy, ReplicaSample, ScaleDecision, TierState
from strata.load import LoadReport
from strata.platform.base import Platform, Replica

if TYPE_CHECKING:
    from strata.autoscale.loop import TierObserver
    from strata.config import StageScaling
    from strata.stages.tiers import StageTier

STAGE_BUSY = "custom_stage_busy"  # 0..1
STAGE_QUEUE = "custom_stage_queue"  # micro-batches waiting


def stage_sample(
    replica_id: str, body: Mapping[str, Any] | None, *, started_at: float,
    ready: bool | None = None, ready_changed_at: float | None = None,
    terminating: bool = False, sampled_at: float | None = None,
) -> ReplicaSample:
    """A stage replica as the autoscaler sees it: its report plus the stage signals."""
    report = LoadReport.from_dict(dict(body)) if body is not None else None
    sample = ReplicaSample.from_report(
        replica_id, report, started_at=started_at, ready=ready,
        ready_changed_at=ready_changed_at, sampled_at=sampled_at, terminating=terminating,
    )
    if body is None:
        return sample
    extra = {
        STAGE_BUSY: float(body.get("busy_ratio", 0.0)),
        STAGE_QUEUE: float(body.get("queued_frames", 0.0)),
    }
    return ReplicaSample(
        replica_id=sample.replica_id, started_at=sample.started_at, ready=sample.ready,
        ready_changed_at=sample.ready_changed_at, terminating=sample.terminating,
        report=sample.report, sampled_at=sample.sampled_at, in_flight=sample.in_flight,
        extra=extra,
    )


def stage_autoscaling(max_replicas: int, min_replicas: int = 1, target_busy_pct: int = 80,
                      downscale_stabilization_s: int | None = None) -> dict[str, Any]:
    """An `autoscaling` block for a stage tier: HPA on the stage's busy ratio."""
    block: dict[str, Any] = {
        "policy": "hpa",
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "metrics": [{"name": STAGE_BUSY, "type": "Utilization",
                     "average_utilization": target_busy_pct}],
    }
    if downscale_stabilization_s is not None:
        block["downscale_stabilization_s"] = downscale_stabilization_s
    return block


def bottleneck(states: Mapping[str, TierState]) -> str | None:
    """The stage whose serving replicas are busiest on average (queue length breaks ties)."""
    best: tuple[float, float, str] | None = None
    for name, st in states.items():
        busy = [r.extra.get(STAGE_BUSY, 0.0) for r in st.replicas if r.serving]
        queue = [r.extra.get(STAGE_QUEUE, 0.0) for r in st.replicas if r.serving]
        if not busy:
            continue
        key = (sum(busy) / len(busy), sum(queue) / len(queue), name)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


class StageObserver:
    """`TierObserver` for stage tiers: platform replicas + each one's /load."""

    def __init__(self, platform: Platform, http: httpx.AsyncClient) -> None:
        self.platform = platform
        self.http = http
        self.latest: dict[str, TierState] = {}  # each stage tier's last observed state

    async def _load(self, replica: Replica) -> dict[str, Any] | None:
        if replica.url is None or replica.phase in ("starting", "backoff"):
            return None
        try:
            resp = await self.http.get(replica.url + "/load")
            return resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    async def observe(self, tier: str, now: float) -> TierState:
        """The stage tier's state at `now` (platform clock)."""
        replicas = self.platform.replicas(tier)
        bodies = await asyncio.gather(*(self._load(r) for r in replicas))
        samples = tuple(
            stage_sample(r.replica_id, body, started_at=r.started_at, ready=r.ready,
                         ready_changed_at=r.ready_at, terminating=r.terminating,
                         sampled_at=now if body is not None else None)
            for r, body in zip(replicas, bodies, strict=True)
        )
        queued = sum(s.extra.get(STAGE_QUEUE, 0.0) for s in samples)
        state = TierState(tier=tier, current_replicas=self.platform.desired(tier),
                          replicas=samples, extra={STAGE_QUEUE: queued})
        self.latest[tier] = state
        return state


class BottleneckFirst:
    """One stage tier's policy, gated so that only its pipeline's bottleneck stage grows.

    The control loop observes every tier before any policy decides, so `observer.latest`
    holds this tick's state of every autoscaled stage of the pipeline (`group`). A
    scale-up of a stage that is not the busiest one is held at the current count (the
    bottleneck grows first; once it has, the others' own signals decide next tick);
    scale-downs pass unchanged.
    """

    def __init__(self, inner: AutoscalingPolicy, tier: str, group: Sequence[str],
                 observer: StageObserver) -> None:
        finish = getattr(inner, "finish", None)
        if finish is None:
            raise TypeError(f"policy {inner.name!r} has no ScaleFinish to hold scale-ups in")
        self.inner = inner
        self.tier = tier
        self.group = tuple(group)
        self.observer = observer
        self.name = inner.name
        self.recommended_tick_s = inner.recommended_tick_s
        # The veto runs inside the inner policy's finish, before it records a change.
        finish.hold_up = self._hold

    def _hold(self, state: TierState) -> str | None:
        """Why this stage may not grow now: another stage of the pipeline is busier."""
        states = {t: self.observer.latest[t] for t in self.group if t in self.observer.latest}
        states[self.tier] = state
        top = bottleneck(states)
        if top is None or top == self.tier:
            return None
        return f"held: stage tier {top} is the bottleneck"

    def decide(self, state: TierState, now: float) -> ScaleDecision:
        """The inner policy's decision, held when it grows a stage that is not the bottleneck."""
        return self.inner.decide(state, now)


class PipelineObservers:
    """The loop's observer with a pipeline: stage tiers through `StageObserver`, the rest
    (the head, engine tiers) through `default`."""

    def __init__(self, default: TierObserver, stages: StageObserver,
                 stage_tiers: set[str]) -> None:
        self.default = default
        self.stages = stages
        self.stage_tiers = stage_tiers

    async def observe(self, tier: str, now: float) -> TierState:
        """The tier's state from whichever observer reads it."""
        if tier in self.stage_tiers:
            return await self.stages.observe(tier, now)
        return await self.default.observe(tier, now)


def pipeline_policies(tiers: Sequence[StageTier], scaling: StageScaling,
                      observer: StageObserver) -> dict[str, AutoscalingPolicy]:
    """One bottleneck-first HPA on the busy ratio per stage tier that may change size."""
    from strata.autoscale.registry import build_policy

    scaled = [t for t in tiers if t.autoscaled]
    return {t.name: BottleneckFirst(
        build_policy(stage_autoscaling(t.max_replicas, t.min_replicas, scaling.target_busy_pct,
                                       scaling.downscale_stabilization_s)),
        t.name, [s.name for s in scaled], observer) for t in scaled}
