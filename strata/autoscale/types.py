"""What an autoscaling policy sees (one tier's observed state) and what it says (a decision).

The control loop and the simulator build a ``TierState`` from the replicas' load reports
(``strata.load.LoadReport``) plus facts only the gateway and the platform know: arrival
rate, requests held by the activator, TTFT/TPOT observations, readiness and start times.
A policy turns it into a ``ScaleDecision``; nothing here reads a clock or does I/O.

Times are seconds on the caller's clock (the same clock as the ``now`` passed to
``decide``), so the simulator can run on virtual time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from strata.load import LoadReport

# Per-replica metrics a policy may name; each is read from the replica's LoadReport, the
# gateway's own count (``in_flight``) or the sample's ``extra`` mapping.
REPLICA_METRICS: dict[str, str] = {
    "kv_usage": "fraction of KV blocks in use (0..1), a utilization",
    "running": "sequences in the running batch",
    "waiting": "sequences queued on the replica",
    "concurrency": "running + waiting sequences",
    "waiting_prompt_tokens": "prompt tokens still to prefill",
    "prompt_tokens_per_s": "measured prefill rate",
    "generation_tokens_per_s": "measured decode rate",
    "tokens_per_s": "prefill + decode tokens per second",
    "in_flight": "gateway's count of requests sent to the replica and not finished",
}

# Tier-level metrics (Kubernetes' External/Object metrics), measured by the gateway.
TIER_METRICS: dict[str, str] = {
    "arrival_rate_rps": "requests per second arriving for the tier",
    "arrival_tokens_per_s": "prompt + output tokens per second arriving for the tier",
    "pending_requests": "requests held by the gateway/activator, not yet dispatched",
    "in_flight_requests": "requests dispatched to the tier and not finished",
    "concurrency": "in_flight_requests + pending_requests",
    "ttft_p90_s": "90th percentile time to first token over the recent window",
    "tpot_p90_s": "90th percentile time per output token over the recent window",
}


@dataclass(frozen=True, slots=True)
class ReplicaSample:
    """One replica of a tier as the platform and gateway know it right now.

    ``ready_changed_at`` is when ``ready`` last flipped (Kubernetes' Ready condition
    transition time); ``None`` means the replica has never been ready, i.e. it is still
    starting, which Kubernetes' HPA treats like a Pending pod. ``report`` is ``None`` when
    the replica's load could not be scraped (a "missing metric" to the HPA).
    """

    replica_id: str
    started_at: float
    ready: bool = True
    ready_changed_at: float | None = None
    terminating: bool = False
    report: LoadReport | None = None
    sampled_at: float | None = None  # when ``report`` was taken; None: at ``now``
    in_flight: int | None = None  # gateway-side count of unfinished requests
    extra: Mapping[str, float] = field(default_factory=dict)
    # The replica's size relative to its tier's others (Kubernetes weights utilization by
    # each pod's request); replicas of one tier may differ in size on Kubernetes.
    capacity: float = 1.0

    def __post_init__(self) -> None:
        if not self.capacity > 0:
            raise ValueError(f"ReplicaSample.capacity must be > 0, got {self.capacity}")
        if self.ready and self.ready_changed_at is None:
            # A ready replica has been ready at least since it started.
            object.__setattr__(self, "ready_changed_at", self.started_at)

    @classmethod
    def from_report(
        cls,
        replica_id: str,
        report: LoadReport | None,
        *,
        started_at: float,
        ready: bool | None = None,
        ready_changed_at: float | None = None,
        sampled_at: float | None = None,
        in_flight: int | None = None,
        terminating: bool = False,
    ) -> ReplicaSample:
        """Build a sample from a /load report; readiness defaults to the report's own flag.

        Without a report and without an explicit ``ready`` the replica counts as ready only
        if it has been ready before (its metrics are then "missing", not "unready").
        """
        if ready is None:
            ready = bool(report.ready) if report is not None else ready_changed_at is not None
        draining = bool(report.draining) if report is not None else False
        return cls(
            replica_id=replica_id,
            started_at=started_at,
            ready=ready,
            ready_changed_at=ready_changed_at,
            terminating=terminating or draining,
            report=report,
            sampled_at=sampled_at,
            in_flight=in_flight,
        )

    @property
    def has_been_ready(self) -> bool:
        """False while the replica is still starting (never passed a readiness check)."""
        return self.ready_changed_at is not None

    @property
    def serving(self) -> bool:
        """Ready and not on its way out: counts toward the tier's capacity."""
        return self.ready and not self.terminating

    def metric(self, name: str) -> float | None:
        """The named per-replica metric, or None when this replica does not report it."""
        if name in self.extra:
            return float(self.extra[name])
        if name == "in_flight":
            return None if self.in_flight is None else float(self.in_flight)
        r = self.report
        if r is None:
            return None
        if name == "kv_usage":
            return r.kv_usage
        if name == "running":
            return float(r.running)
        if name == "waiting":
            return float(r.waiting)
        if name == "concurrency":
            return float(r.running + r.waiting)
        if name == "waiting_prompt_tokens":
            return float(r.waiting_prompt_tokens)
        if name == "prompt_tokens_per_s":
            return r.prompt_tokens_per_s
        if name == "generation_tokens_per_s":
            return r.generation_tokens_per_s
        if name == "tokens_per_s":
            return r.prompt_tokens_per_s + r.generation_tokens_per_s
        return None


def percentile(values: tuple[float, ...] | list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True, slots=True)
class TierState:
    """Everything observed about one tier at one instant.

    ``current_replicas`` is the replica count last asked of the platform (Kubernetes'
    ``spec.replicas``); ``replicas`` are the replicas that exist (``status``), starting,
    ready or terminating. Rates and observation windows are the gateway's recent window.
    """

    tier: str
    current_replicas: int
    replicas: tuple[ReplicaSample, ...] = ()
    arrival_rate_rps: float = 0.0
    mean_prompt_tokens: float = 0.0  # per request, over the recent window
    mean_output_tokens: float = 0.0  # per request, over the recent window
    pending_requests: int = 0  # held by the gateway/activator, not dispatched yet
    in_flight_requests: int | None = None  # None: derive from the replicas' reports
    last_request_at: float | None = None
    ttft_s: tuple[float, ...] = ()  # recent time-to-first-token observations
    tpot_s: tuple[float, ...] = ()  # recent time-per-output-token observations
    startup_s: tuple[float, ...] = ()  # recent replica start-up durations (start -> ready)
    extra: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.current_replicas < 0:
            raise ValueError(
                f"TierState.current_replicas must be >= 0, got {self.current_replicas}"
            )
        if self.pending_requests < 0:
            raise ValueError(
                f"TierState.pending_requests must be >= 0, got {self.pending_requests}"
            )

    @property
    def live_replicas(self) -> tuple[ReplicaSample, ...]:
        """Replicas that exist and are not terminating (Kubernetes' status.replicas)."""
        return tuple(r for r in self.replicas if not r.terminating)

    @property
    def ready_count(self) -> int:
        """Replicas that are ready and not terminating."""
        return sum(1 for r in self.replicas if r.serving)

    @property
    def arrival_tokens_per_s(self) -> float:
        """Prompt plus output tokens per second arriving: the demand in token units."""
        return self.arrival_rate_rps * (self.mean_prompt_tokens + self.mean_output_tokens)

    @property
    def tokens_per_request(self) -> float:
        """Mean prompt plus output tokens of one request over the recent window."""
        return self.mean_prompt_tokens + self.mean_output_tokens

    @property
    def dispatched_requests(self) -> int:
        """Requests on the replicas: the gateway's count, else the reports' running+waiting."""
        if self.in_flight_requests is not None:
            return self.in_flight_requests
        total = 0
        for r in self.live_replicas:
            if r.in_flight is not None:
                total += r.in_flight
            elif r.report is not None:
                total += r.report.running + r.report.waiting
        return total

    @property
    def concurrency(self) -> int:
        """Requests in the tier's hands: dispatched plus held by the activator."""
        return self.dispatched_requests + self.pending_requests

    def metric(self, name: str) -> float | None:
        """The named tier-level metric, or None when it is not observed."""
        if name in self.extra:
            return float(self.extra[name])
        if name == "arrival_rate_rps":
            return self.arrival_rate_rps
        if name == "arrival_tokens_per_s":
            return self.arrival_tokens_per_s
        if name == "pending_requests":
            return float(self.pending_requests)
        if name == "in_flight_requests":
            return float(self.dispatched_requests)
        if name == "concurrency":
            return float(self.concurrency)
        if name == "ttft_p90_s":
            return percentile(self.ttft_s, 90)
        if name == "tpot_p90_s":
            return percentile(self.tpot_s, 90)
        return None


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """A policy's answer for one tier, with the evidence the control loop logs and exports.

    ``metrics`` holds the metric values and intermediate proposals the policy used,
    under stable names, so every decision can be exported as gauges and explained.
    """

    tier: str
    current: int
    desired: int
    policy: str
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    at: float = 0.0

    @property
    def scales(self) -> bool:
        """True when the platform must change the replica count."""
        return self.desired != self.current

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form for the decision log."""
        return {
            "tier": self.tier,
            "at": self.at,
            "policy": self.policy,
            "current": self.current,
            "desired": self.desired,
            "reason": self.reason,
            "metrics": dict(self.metrics),
        }


class ConfigModel(BaseModel):
    """Base of every autoscaling config model: strict, immutable, snake_case or camelCase.

    camelCase aliases let Kubernetes-style keys (``stabilizationWindowSeconds``) and
    Python-style keys (``stabilization_window_seconds``) both validate; unknown keys fail.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        loc_by_alias=False,
    )


class AutoscalingPolicy(Protocol):
    """A pure policy: its config and its own history, advanced only by ``decide``.

    The caller must apply every decision it gets (as the Kubernetes controller does):
    policies remember the changes they asked for, for their rate limits and windows.
    ``recommended_tick_s`` is how often the original calls its decider.
    """

    name: str
    recommended_tick_s: float

    def decide(self, state: TierState, now: float) -> ScaleDecision:
        """The desired replica count for the tier at time ``now`` (seconds)."""
        ...
