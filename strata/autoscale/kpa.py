"""Knative's Pod Autoscaler (KPA): stable and panic windows over concurrency or RPS.

Matches knative/serving **v1.23** (``pkg/autoscaler/scaling/autoscaler.go``, the
defaults of ``pkg/autoscaler/config``, bounds and scale-to-zero of
``pkg/reconciler/autoscaling/kpa/scaler.go``; learned from, not copied):

* target per replica = ``target * target_utilization`` (100 concurrent requests x 0.7,
  or 200 req/s x 0.7), never below 0.01;
* the observed value is averaged over the stable window (60 s) and the panic window
  (10 % of it, 6 s); ``desired = ceil(average / target)`` for each, kept within
  ``[floor(ready / max_scale_down_rate), ceil(max_scale_up_rate * ready)]``
  (ready counts as 1 at zero);
* panic starts when the panic-window proposal reaches ``panic_threshold`` (200 %) of the
  ready replicas, is extended while it stays there, and ends one stable window after the
  last time it did; while panicking the larger of both proposals is used and the count
  never goes down;
* an autoscaler that first sees more than one ready replica starts in panic, so a restart
  (lost history) cannot scale the tier down;
* ``scale_down_delay_s`` holds the highest recent desired count for that long;
* bounds, then scale to zero after the grace period (``strata.autoscale.zero``).

Knative's collector averages one-second buckets filled by a one-second scraper; here each
``decide`` call adds one sample and the window average is the mean of the samples inside
the window, which is the same thing when ``decide`` runs at a regular tick.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from pydantic import Field

from strata.autoscale.finish import BoundedConfig, Proposal, ScaleFinish
from strata.autoscale.types import ScaleDecision, TierState

TARGET_MIN = 0.01  # Knative's autoscaling.TargetMin


class KpaConfig(BoundedConfig):
    """``autoscaling: {policy: kpa, ...}``; defaults are Knative's ``config-autoscaler``."""

    policy: Literal["kpa"] = "kpa"
    metric: Literal["concurrency", "rps"] = "concurrency"
    target: float | None = Field(default=None, gt=0)  # None: 100 concurrency / 200 rps
    target_utilization: float = Field(default=0.7, gt=0.0, le=1.0)
    stable_window_s: float = Field(default=60.0, ge=6.0, le=3600.0)
    panic_window_percentage: float = Field(default=10.0, ge=1.0, le=100.0)
    panic_threshold_percentage: float = Field(default=200.0, ge=110.0, le=1000.0)
    max_scale_up_rate: float = Field(default=1000.0, gt=1.0)
    max_scale_down_rate: float = Field(default=2.0, gt=1.0)
    scale_down_delay_s: float = Field(default=0.0, ge=0.0, le=3600.0)
    target_burst_capacity: float = Field(default=211.0, ge=-1.0)
    activation_scale: int = Field(default=1, ge=1)
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)  # None: unbounded, as Knative's 0
    scale_to_zero_grace_s: float = Field(default=30.0, ge=0.0)
    scale_to_zero_retention_s: float = Field(default=0.0, ge=0.0)

    @property
    def total_value(self) -> float:
        """The most of the metric one replica is meant to take (Knative's TotalValue)."""
        if self.target is not None:
            return self.target
        return 100.0 if self.metric == "concurrency" else 200.0

    @property
    def target_value(self) -> float:
        """The per-replica value the KPA aims for (Knative's TargetValue)."""
        return max(TARGET_MIN, self.total_value * self.target_utilization)

    @property
    def panic_window_s(self) -> float:
        """The short window that detects bursts."""
        return self.stable_window_s * self.panic_window_percentage / 100.0


class _WindowAverage:
    """Mean of the samples recorded within the last ``window_s`` seconds."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def record(self, now: float, value: float) -> None:
        """Add the value observed at ``now``."""
        self._samples.append((now, value))

    def average(self, now: float) -> float:
        """Mean over the window ending at ``now``; 0 when nothing is in it (Knative too)."""
        cutoff = now - self.window_s
        while self._samples and self._samples[0][0] <= cutoff:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        return sum(v for _, v in self._samples) / len(self._samples)


class _MaxWindow:
    """Highest value recorded within the last ``window_s`` seconds (Knative's delay window)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._values: deque[tuple[float, int]] = deque()

    def record(self, now: float, value: int) -> int:
        """Add ``value`` at ``now`` and return the highest one still in the window."""
        self._values.append((now, value))
        cutoff = now - self.window_s
        while self._values and self._values[0][0] <= cutoff:
            self._values.popleft()
        return max(v for _, v in self._values)


class KpaPolicy:
    """A Knative KPA decider for one tier, with its windows and panic state."""

    name = "kpa"
    recommended_tick_s = 2.0  # Knative's decider tick interval

    def __init__(self, config: KpaConfig) -> None:
        self.config = config
        self._stable = _WindowAverage(config.stable_window_s)
        self._panic = _WindowAverage(config.panic_window_s)
        self._delay = (
            _MaxWindow(config.scale_down_delay_s) if config.scale_down_delay_s > 0 else None
        )
        self.finish = ScaleFinish(config)  # the windows above are the KPA's behaviour
        self.panic_since: float | None = None  # Knative's panicTime (last time over threshold)
        self.max_panic_pods = 0
        self._started = False

    @property
    def panicking(self) -> bool:
        """True while the decider is in panic mode."""
        return self.panic_since is not None

    def _observe(self, state: TierState) -> float:
        if self.config.metric == "rps":
            return state.arrival_rate_rps
        return float(state.concurrency)

    def decide(self, state: TierState, now: float) -> ScaleDecision:
        """One tick of the KPA decider for the tier at ``now``, then bounds and zero."""
        return self.finish.decide(self.name, state, now, self.proposal(state, now))

    def proposal(self, state: TierState, now: float) -> Proposal:
        """The decider's count before bounds (stable or panic, then the scale-down delay)."""
        cfg = self.config
        ready = state.ready_count
        if not self._started:
            # A new autoscaler starts in panic when more than one replica is ready.
            self._started = True
            if ready > 1:
                self.panic_since = now
                self.max_panic_pods = ready
        ready_for_math = max(1, ready)

        observed = self._observe(state)
        self._stable.record(now, observed)
        self._panic.record(now, observed)
        stable_value = self._stable.average(now)
        panic_value = self._panic.average(now)

        max_scale_up = math.ceil(cfg.max_scale_up_rate * ready_for_math)
        max_scale_down = math.floor(ready_for_math / cfg.max_scale_down_rate)
        dspc = math.ceil(stable_value / cfg.target_value)
        dppc = math.ceil(panic_value / cfg.target_value)
        desired_stable = int(min(max(dspc, max_scale_down), max_scale_up))
        desired_panic = int(min(max(dppc, max_scale_down), max_scale_up))
        if cfg.activation_scale > 1:
            if dspc > 0 and cfg.activation_scale > desired_stable:
                desired_stable = cfg.activation_scale
            if dppc > 0 and cfg.activation_scale > desired_panic:
                desired_panic = cfg.activation_scale

        reasons: list[str] = []
        over_threshold = dppc / ready_for_math >= cfg.panic_threshold_percentage / 100.0
        if self.panic_since is None and over_threshold:
            self.panic_since = now
            reasons.append("entering panic")
        elif over_threshold:
            self.panic_since = now
        elif self.panic_since is not None and self.panic_since + cfg.stable_window_s < now:
            self.panic_since = None
            self.max_panic_pods = 0
            reasons.append("leaving panic")

        desired = desired_stable
        if self.panic_since is not None:
            desired = max(desired, desired_panic)
            if desired > self.max_panic_pods:
                self.max_panic_pods = desired
            elif desired < self.max_panic_pods:
                reasons.append(f"panic: not scaling down from {self.max_panic_pods} to {desired}")
            desired = self.max_panic_pods
            reasons.append(
                f"panic mode: {cfg.metric} {panic_value:.2f} over {cfg.panic_window_s:.0f} s"
            )
        else:
            reasons.append(
                f"stable mode: {cfg.metric} {stable_value:.2f} over {cfg.stable_window_s:.0f} s, "
                f"target {cfg.target_value:.2f} per replica"
            )

        if self._delay is not None:
            delayed = self._delay.record(now, desired)
            if delayed != desired:
                reasons.append(f"scale-down delayed: holding {delayed}")
                desired = delayed

        excess_burst = -1.0
        if cfg.target_burst_capacity == 0:
            excess_burst = 0.0
        elif cfg.target_burst_capacity > 0:
            excess_burst = math.floor(
                ready * cfg.total_value - cfg.target_burst_capacity - panic_value
            )
        metrics = {
            f"stable_{cfg.metric}": stable_value,
            f"panic_{cfg.metric}": panic_value,
            "target_per_replica": cfg.target_value,
            "desired_stable": float(desired_stable),
            "desired_panic": float(desired_panic),
            "panic": 1.0 if self.panicking else 0.0,
            "ready_replicas": float(ready),
            "excess_burst_capacity": float(excess_burst),
        }
        return Proposal(desired, reasons, metrics)
