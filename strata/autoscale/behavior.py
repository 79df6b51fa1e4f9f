"""Kubernetes HPA behaviour: stabilization windows, scaling-rate policies and min/max.

The second and third of the HPA's steps (``horizontal.go`` of Kubernetes v1.34, learned
from, not copied): a raw recommendation is first *stabilized* against the recent ones,
then *rate limited* by the Pods/Percent policies over their periods using the history of
scale events, and clamped to ``[min, max]``.

* ``behavior`` absent: the legacy path. Scale-down is stabilized over the controller's
  ``--horizontal-pod-autoscaler-downscale-stabilization`` window (300 s) by taking the
  highest recent recommendation; scale-up is limited per decision to
  ``max(2 * current, 4)``.
* ``behavior`` present: unset fields take the API defaults (``GenerateHPAScale*Rules``):
  scale-up 0 s stabilization, ``Pods 4 / 15 s`` and ``Percent 100 / 15 s``, ``Max``;
  scale-down 300 s stabilization (the controller flag), ``Percent 100 / 15 s``, ``Max``.
  The recommendation is held between the lowest recent one (scale-up window) and the
  highest recent one (scale-down window). A policy allows, from the replica count at the
  start of its period (current minus the period's additions plus its removals),
  ``+value`` pods or ``ceil(start * (1 + pct))`` up, ``-value`` pods or
  ``floor(start * (1 - pct))`` down; ``Max`` takes the policy allowing the most change,
  ``Min`` the least, ``Disabled`` none.

History is recorded exactly as the controller keeps it, including the reuse of outdated
slots, because the rate limits depend on which old events survive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from strata.autoscale.replica_calculator import Tolerances
from strata.autoscale.types import ConfigModel

SelectPolicy = Literal["Max", "Min", "Disabled"]

# kube-controller-manager defaults.
DEFAULT_DOWNSCALE_STABILIZATION_S = 300
DEFAULT_TOLERANCE = 0.1
LEGACY_SCALE_UP_FACTOR = 2.0
LEGACY_SCALE_UP_MINIMUM = 4.0


class ScalingPolicy(ConfigModel):
    """One rate limit: at most ``value`` pods (or percent) of change per ``period_seconds``."""

    type: Literal["Pods", "Percent"]
    value: int = Field(gt=0)
    period_seconds: int = Field(gt=0, le=1800)


class ScalingRules(ConfigModel):
    """One direction's behaviour; a field left unset takes the Kubernetes default."""

    stabilization_window_seconds: int | None = Field(default=None, ge=0, le=3600)
    select_policy: SelectPolicy | None = None
    policies: tuple[ScalingPolicy, ...] | None = None
    tolerance: float | None = Field(default=None, ge=0.0)

    @field_validator("policies")
    @classmethod
    def _at_least_one(cls, v: tuple[ScalingPolicy, ...] | None) -> tuple[ScalingPolicy, ...] | None:
        if v is not None and len(v) == 0:
            raise ValueError("policies must list at least one policy (or be omitted for defaults)")
        return v


class Behavior(ConfigModel):
    """The HPA ``spec.behavior`` block."""

    scale_up: ScalingRules | None = None
    scale_down: ScalingRules | None = None


@dataclass(frozen=True, slots=True)
class ResolvedRules:
    """A direction's rules with every default filled in."""

    stabilization_window_s: int
    select_policy: SelectPolicy
    policies: tuple[ScalingPolicy, ...]
    tolerance: float

    @property
    def longest_period_s(self) -> int:
        """How long scale events matter to this direction's policies."""
        return max((p.period_seconds for p in self.policies), default=0)


def resolve_rules(
    behavior: Behavior,
    *,
    downscale_stabilization_s: int = DEFAULT_DOWNSCALE_STABILIZATION_S,
    tolerance: float = DEFAULT_TOLERANCE,
) -> tuple[ResolvedRules, ResolvedRules]:
    """(scale-up, scale-down) rules with the API's and the controller's defaults applied."""
    up = behavior.scale_up or ScalingRules()
    down = behavior.scale_down or ScalingRules()
    up_rules = ResolvedRules(
        stabilization_window_s=(
            0 if up.stabilization_window_seconds is None else up.stabilization_window_seconds
        ),
        select_policy=up.select_policy or "Max",
        policies=up.policies
        or (
            ScalingPolicy(type="Pods", value=4, period_seconds=15),
            ScalingPolicy(type="Percent", value=100, period_seconds=15),
        ),
        tolerance=tolerance if up.tolerance is None else up.tolerance,
    )
    down_rules = ResolvedRules(
        stabilization_window_s=(
            downscale_stabilization_s
            if down.stabilization_window_seconds is None
            else down.stabilization_window_seconds
        ),
        select_policy=down.select_policy or "Max",
        policies=down.policies or (ScalingPolicy(type="Percent", value=100, period_seconds=15),),
        tolerance=tolerance if down.tolerance is None else down.tolerance,
    )
    return up_rules, down_rules


@dataclass(slots=True)
class _Recommendation:
    replicas: int
    at: float


@dataclass(slots=True)
class _ScaleEvent:
    change: int  # absolute number of replicas added or removed
    at: float
    outdated: bool = False


@dataclass(frozen=True, slots=True)
class Normalized:
    """The behaviour step's result with Kubernetes' condition reasons for the log."""

    desired: int
    stabilized: int  # the recommendation after stabilization, before rate limits
    stabilization: str  # ScaleUpStabilized | ScaleDownStabilized | ReadyForNewScale
    limit: (
        str  # DesiredWithinRange | ScaleUpLimit | ScaleDownLimit | TooManyReplicas | TooFewReplicas
    )


def _change_in_period(events: list[_ScaleEvent], period_s: int, now: float) -> int:
    cutoff = now - period_s
    return sum(e.change for e in events if e.at > cutoff)


class Normalizer:
    """The HPA's behaviour step for one scale target, with the history it needs.

    Call ``normalize`` once per decision with the raw metric proposal, then
    ``record_scale`` when the replica count is actually changed.
    """

    def __init__(
        self,
        behavior: Behavior | None,
        *,
        downscale_stabilization_s: int = DEFAULT_DOWNSCALE_STABILIZATION_S,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        self.behavior = behavior
        self.downscale_stabilization_s = downscale_stabilization_s
        self.tolerance = tolerance
        self.rules: tuple[ResolvedRules, ResolvedRules] | None = None
        if behavior is not None:
            self.rules = resolve_rules(
                behavior, downscale_stabilization_s=downscale_stabilization_s, tolerance=tolerance
            )
        self._recommendations: list[_Recommendation] = []
        self._up_events: list[_ScaleEvent] = []
        self._down_events: list[_ScaleEvent] = []

    @property
    def tolerances(self) -> Tolerances:
        """Per-direction tolerances: the behaviour's own, else the controller-wide one."""
        if self.rules is None:
            return Tolerances(self.tolerance, self.tolerance)
        up, down = self.rules
        return Tolerances(scale_down=down.tolerance, scale_up=up.tolerance)

    def record_initial(self, current: int, now: float) -> None:
        """Seed the history with the current count the first time the target is seen."""
        if not self._recommendations:
            self._recommendations.append(_Recommendation(current, now))

    def normalize(
        self, current: int, desired: int, min_replicas: int, max_replicas: int, now: float
    ) -> Normalized:
        """Stabilize, rate-limit and clamp a raw proposal; records the proposal."""
        if self.rules is None:
            return self._normalize_legacy(current, desired, min_replicas, max_replicas, now)
        return self._normalize_with_behavior(current, desired, min_replicas, max_replicas, now)

    def _store_recommendation(self, old_index: int | None, desired: int, now: float) -> None:
        if old_index is not None:
            self._recommendations[old_index] = _Recommendation(desired, now)
        else:
            self._recommendations.append(_Recommendation(desired, now))

    def _normalize_legacy(
        self, current: int, desired: int, min_replicas: int, max_replicas: int, now: float
    ) -> Normalized:
        cutoff = now - self.downscale_stabilization_s
        stabilized = desired
        old_index: int | None = None
        for i, rec in enumerate(self._recommendations):
            if rec.at < cutoff:
                old_index = i
            elif rec.replicas > stabilized:
                stabilized = rec.replicas
        self._store_recommendation(old_index, desired, now)
        stabilization = "ScaleDownStabilized" if stabilized != desired else "ReadyForNewScale"

        up_limit = int(max(LEGACY_SCALE_UP_FACTOR * current, LEGACY_SCALE_UP_MINIMUM))
        if max_replicas > up_limit:
            maximum, limit = up_limit, "ScaleUpLimit"
        else:
            maximum, limit = max_replicas, "TooManyReplicas"
        if stabilized < min_replicas:
            return Normalized(min_replicas, stabilized, stabilization, "TooFewReplicas")
        if stabilized > maximum:
            return Normalized(maximum, stabilized, stabilization, limit)
        return Normalized(stabilized, stabilized, stabilization, "DesiredWithinRange")

    def _normalize_with_behavior(
        self, current: int, desired: int, min_replicas: int, max_replicas: int, now: float
    ) -> Normalized:
        assert self.rules is not None
        up, down = self.rules
        up_cutoff = now - up.stabilization_window_s
        down_cutoff = now - down.stabilization_window_s
        up_rec = down_rec = desired
        old_index: int | None = None
        for i, rec in enumerate(self._recommendations):
            if rec.at > up_cutoff:
                up_rec = min(up_rec, rec.replicas)
            if rec.at > down_cutoff:
                down_rec = max(down_rec, rec.replicas)
            if rec.at < up_cutoff and rec.at < down_cutoff:
                old_index = i
        stabilized = min(max(current, up_rec), down_rec)
        self._store_recommendation(old_index, desired, now)
        if stabilized == desired:
            stabilization = "ReadyForNewScale"
        elif desired >= current:
            stabilization = "ScaleUpStabilized"
        else:
            stabilization = "ScaleDownStabilized"

        if stabilized > current:
            limit_up = max(
                self.scale_up_limit(current, up, now), current
            )
            if max_replicas > limit_up:
                maximum, limit = limit_up, "ScaleUpLimit"
            else:
                maximum, limit = max_replicas, "TooManyReplicas"
            if stabilized > maximum:
                return Normalized(maximum, stabilized, stabilization, limit)
        elif stabilized < current:
            limit_down = min(
                self.scale_down_limit(current, down, now), current
            )
            if min_replicas < limit_down:
                minimum, limit = limit_down, "ScaleDownLimit"
            else:
                minimum, limit = min_replicas, "TooFewReplicas"
            if stabilized < minimum:
                return Normalized(minimum, stabilized, stabilization, limit)
        return Normalized(stabilized, stabilized, stabilization, "DesiredWithinRange")

    def _period_starts(
        self, current: int, rules: ResolvedRules, now: float
    ) -> list[tuple[ScalingPolicy, int]]:
        """Each of the direction's policies with the replica count at its period's start."""
        return [
            (
                policy,
                current
                - _change_in_period(self._up_events, policy.period_seconds, now)
                + _change_in_period(self._down_events, policy.period_seconds, now),
            )
            for policy in rules.policies
        ]

    def scale_up_limit(self, current: int, rules: ResolvedRules, now: float) -> int:
        """The most replicas the scale-up policies allow now (``calculateScaleUpLimitWithScalingRules``)."""
        if rules.select_policy == "Disabled":
            return current
        allowed = [
            start + policy.value
            if policy.type == "Pods"
            # rounded up, or a small percentage could never add a replica
            else math.ceil(start * (1 + policy.value / 100))
            for policy, start in self._period_starts(current, rules, now)
        ]
        return min(allowed) if rules.select_policy == "Min" else max(allowed)

    def scale_down_limit(self, current: int, rules: ResolvedRules, now: float) -> int:
        """The fewest replicas the scale-down policies allow now (``calculateScaleDownLimitWithBehaviors``)."""
        if rules.select_policy == "Disabled":
            return current
        allowed = [
            start - policy.value
            if policy.type == "Pods"
            # int32() truncation: the replicas that stay are rounded down
            else int(start * (1 - policy.value / 100))
            for policy, start in self._period_starts(current, rules, now)
        ]
        # "Min" is the least change: for a scale-down, the highest count.
        return max(allowed) if rules.select_policy == "Min" else min(allowed)

    def record_scale(self, previous: int, new: int, now: float) -> None:
        """Remember an actual change of replica count for the rate limits (``storeScaleEvent``)."""
        if self.rules is None or new == previous:
            return  # the legacy path keeps no events
        up, down = self.rules
        if new > previous:
            events, rules, change = self._up_events, up, new - previous
        else:
            events, rules, change = self._down_events, down, previous - new
        cutoff = now - rules.longest_period_s
        old_index: int | None = None
        for i, event in enumerate(events):
            if event.at < cutoff:
                event.outdated = True
            if event.outdated:
                old_index = i
        if old_index is not None:
            events[old_index] = _ScaleEvent(change, now)
        else:
            events.append(_ScaleEvent(change, now))
