"""The finish every autoscaling policy shares: bounds, behaviour, scale to zero, decision.

A policy only computes a raw ``Proposal`` (a replica count and its evidence: reasons and
metrics). ``ScaleFinish.decide`` turns it into the ``ScaleDecision``, the way Kubernetes'
HPA controller wraps its replica calculator (out-of-range correction, then
``normalizeDesiredReplicas``) and Ray Serve wraps a custom policy
(``_apply_autoscaling_config``):

1. **Bounds and behaviour.** With the HPA's behaviour step (``hpa``, ``llm``,
   ``predictive``): a current count outside ``[min_replicas, max_replicas]`` is brought
   back at once without consulting the proposal; otherwise the proposal is stabilized,
   rate-limited and clamped by ``strata.autoscale.behavior.Normalizer``. Without it
   (``kpa``, whose panic and delay windows are its behaviour): the proposal is clamped.
2. **Scale to zero** (``strata.autoscale.zero``) when ``min_replicas`` is 0.
3. **Record** an actual change for the rate limits, and build the decision with the
   proposal's reasons and metrics plus ``ready_replicas``, ``proposal``, ``stabilized``
   and ``desired``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self

from pydantic import model_validator

from strata.autoscale.behavior import Behavior, Normalizer
from strata.autoscale.replica_calculator import Tolerances
from strata.autoscale.types import ConfigModel, ScaleDecision, TierState
from strata.autoscale.zero import ScaleToZeroGate


class BoundedConfig(ConfigModel):
    """Base of a policy config: its replica bounds and scale-to-zero periods.

    Each config declares the fields itself, with its original's defaults (Knative's
    ``min_replicas`` is 0 and its ``max_replicas`` unbounded); this checks them once.
    """

    if TYPE_CHECKING:
        min_replicas: int
        max_replicas: int | None
        scale_to_zero_grace_s: float
        scale_to_zero_retention_s: float

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


class BehaviorConfig(BoundedConfig):
    """Base of a config whose proposals go through the HPA's behaviour step."""

    if TYPE_CHECKING:
        max_replicas: int
        behavior: Behavior | None
        downscale_stabilization_s: int
        tolerance: float


@dataclass(slots=True)
class Proposal:
    """A policy's raw answer, before bounds, behaviour and the zero gate, with its evidence.

    ``replicas`` None: the policy has nothing to go on this tick (see ``ScaleFinish``).
    """

    replicas: int | None
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class ScaleFinish:
    """Steps 1-3 of the module docstring for one tier, with the history they keep.

    ``disabled_at_zero``: a target at zero replicas with ``min_replicas >= 1`` is left
    alone (the HPA: "scaling is disabled since the replica count of the target is zero").
    ``hold_reason``: what an in-range tick without a proposal does. None: keep the current
    count and skip the behaviour step (the HPA's FailedComputeMetricsReplicas; the proposal
    says why); a string: propose the current count to the behaviour step, with this reason.
    ``hold_up``: set by a wrapper that may veto a scale-up (a pipeline's stage that is not
    its bottleneck): called with the tier's state when the finished count is above the
    current one, it returns why the count stays (or None). The veto comes before anything
    is recorded, so a held scale-up never counts against the rate limits.
    """

    def __init__(
        self,
        config: BoundedConfig,
        normalizer: Normalizer | None = None,
        *,
        disabled_at_zero: bool = False,
        hold_reason: str | None = None,
    ) -> None:
        self.min_replicas = config.min_replicas
        self.max_replicas = config.max_replicas
        self.normalizer = normalizer
        self.disabled_at_zero = disabled_at_zero
        self.hold_reason = hold_reason
        self.hold_up: Callable[[TierState], str | None] | None = None
        self.zero_gate = ScaleToZeroGate(
            grace_s=config.scale_to_zero_grace_s, retention_s=config.scale_to_zero_retention_s
        )

    @classmethod
    def with_behavior(
        cls, config: BehaviorConfig, *, disabled_at_zero: bool = False,
        hold_reason: str | None = None,
    ) -> ScaleFinish:
        """A finish whose behaviour step is the HPA's, from the config's behaviour fields."""
        normalizer = Normalizer(
            config.behavior,
            downscale_stabilization_s=config.downscale_stabilization_s,
            tolerance=config.tolerance,
        )
        return cls(config, normalizer, disabled_at_zero=disabled_at_zero,
                   hold_reason=hold_reason)

    @property
    def tolerances(self) -> Tolerances:
        """The behaviour step's per-direction tolerances, which the proposals use too."""
        if self.normalizer is None:
            raise ValueError("a finish without a behaviour step has no tolerances")
        return self.normalizer.tolerances

    def decide(
        self, policy: str, state: TierState, now: float,
        proposal: Proposal | Callable[[], Proposal],
    ) -> ScaleDecision:
        """The decision for ``state`` at ``now`` from the policy's raw proposal.

        A callable proposal is computed only for a current count within the bounds (the
        HPA reads its metrics only then); a ready one is always reported.
        """
        current = state.current_replicas
        ready = proposal if isinstance(proposal, Proposal) else None
        reasons = list(ready.reasons) if ready is not None else []
        metrics = dict(ready.metrics) if ready is not None else {}
        metrics.setdefault("ready_replicas", float(state.ready_count))

        if self.normalizer is None:
            desired = self._clamp(current, self._take(proposal, reasons, metrics), reasons)
        else:
            self.normalizer.record_initial(current, now)
            out_of_range = self._out_of_range(current, reasons)
            if out_of_range is None:
                taken = self._take(proposal, reasons, metrics)
                desired = self._normalize(current, taken.replicas, now, reasons, metrics)
            else:
                desired = out_of_range

        if self.hold_up is not None and desired > current:
            held = self.hold_up(state)
            if held:
                desired = current
                reasons.append(held)
        if self.min_replicas == 0:
            desired, why = self.zero_gate.apply(
                state, desired, self.min_replicas, self.max_replicas, now
            )
            if why:
                reasons.append(why)
        if self.normalizer is not None and desired != current:
            self.normalizer.record_scale(current, desired, now)
        metrics["desired"] = float(desired)
        return ScaleDecision(
            tier=state.tier,
            current=current,
            desired=desired,
            policy=policy,
            reason="; ".join(reasons),
            metrics=metrics,
            at=now,
        )

    @staticmethod
    def _take(
        proposal: Proposal | Callable[[], Proposal], reasons: list[str],
        metrics: dict[str, float],
    ) -> Proposal:
        """The proposal; a pending one is computed now and its evidence added."""
        if isinstance(proposal, Proposal):
            return proposal
        taken = proposal()
        reasons.extend(taken.reasons)
        metrics.update(taken.metrics)
        return taken

    def _clamp(self, current: int, proposal: Proposal, reasons: list[str]) -> int:
        """The proposal within the bounds (no proposal: the current count)."""
        replicas = current if proposal.replicas is None else proposal.replicas
        bounded = max(replicas, self.min_replicas)
        if self.max_replicas is not None:
            bounded = min(bounded, self.max_replicas)
        if bounded != replicas:
            reasons.append(f"bounded to [{self.min_replicas}, {self.max_replicas or 'inf'}]")
        return bounded

    def _out_of_range(self, current: int, reasons: list[str]) -> int | None:
        """The count a current count outside the bounds goes to at once (None: inside)."""
        if self.disabled_at_zero and current == 0 and self.min_replicas != 0:
            reasons.append("ScalingDisabled: scaling is disabled since the replica count is zero")
            return 0
        if self.max_replicas is not None and current > self.max_replicas:
            reasons.append("current number of replicas above max_replicas")
            return self.max_replicas
        if current < self.min_replicas:
            reasons.append("current number of replicas below min_replicas")
            return self.min_replicas
        return None

    def _normalize(
        self, current: int, replicas: int | None, now: float, reasons: list[str],
        metrics: dict[str, float],
    ) -> int:
        """The behaviour step over a proposal for a current count within the bounds."""
        assert self.normalizer is not None and self.max_replicas is not None
        if replicas is None:
            if self.hold_reason is None:
                return current
            reasons.append(self.hold_reason)
            replicas = current
        metrics["proposal"] = float(replicas)
        normalized = self.normalizer.normalize(
            current, replicas, self.min_replicas, self.max_replicas, now
        )
        metrics["stabilized"] = float(normalized.stabilized)
        if normalized.stabilization != "ReadyForNewScale":
            reasons.append(normalized.stabilization)
        if normalized.limit != "DesiredWithinRange":
            reasons.append(normalized.limit)
        return normalized.desired
