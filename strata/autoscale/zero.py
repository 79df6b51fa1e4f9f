"""Scale to zero and back, shared by every policy (Knative's activator semantics).

Kubernetes' HPA cannot leave zero (``minReplicas`` is at least 1 unless the alpha
``HPAScaleToZero`` gate is on); strata allows ``min_replicas: 0`` for every policy:

* **Activation.** At zero replicas the gateway's activator holds arriving requests and
  reports them as ``pending_requests``; any pending request makes the desired count at
  least one, whatever the policy's metrics say (there are no replicas to measure).
* **Idle wait.** A policy's wish for zero is only granted once the tier has been idle (no
  request pending, in flight or arriving) for ``max(grace, retention)`` seconds, Knative's
  ``scale-to-zero-grace-period`` (30 s) and ``scale-to-zero-pod-retention-period`` (0 s);
  meanwhile one replica is kept, as Knative keeps one while it waits.
"""

from __future__ import annotations

from strata.autoscale.types import TierState


class ScaleToZeroGate:
    """The last word on zero: activation from zero and the idle wait before zero."""

    def __init__(self, *, grace_s: float = 30.0, retention_s: float = 0.0) -> None:
        if grace_s < 0 or retention_s < 0:
            raise ValueError("scale-to-zero grace and retention periods must be >= 0 s")
        self.grace_s = grace_s
        self.retention_s = retention_s
        self._zero_wanted_since: float | None = None

    @property
    def wait_s(self) -> float:
        """How long the tier must be idle before it may go to zero."""
        return max(self.grace_s, self.retention_s)

    def apply(
        self, state: TierState, desired: int, min_replicas: int, max_replicas: int | None,
        now: float,
    ) -> tuple[int, str]:
        """The desired count after the zero rules, and why it changed ("" if it did not).

        ``max_replicas`` None: unbounded (Knative's ``max-scale`` 0).
        """
        if state.current_replicas == 0 and state.pending_requests > 0 and desired < 1:
            self._zero_wanted_since = None
            if max_replicas is not None and max_replicas < 1:
                return desired, ""
            return 1, (
                f"activator holds {state.pending_requests} request(s) for a tier at zero: "
                "asking for one replica"
            )
        if desired > 0 or min_replicas > 0:
            self._zero_wanted_since = None
            return desired, ""
        if state.current_replicas == 0:
            return 0, ""
        if state.concurrency > 0:
            self._zero_wanted_since = None
            return 1, f"{state.concurrency} request(s) in the tier: keeping one replica"
        if self._zero_wanted_since is None:
            self._zero_wanted_since = now
        idle_since = self._zero_wanted_since
        if state.last_request_at is not None:
            idle_since = max(idle_since, state.last_request_at)
        idle_s = now - idle_since
        if idle_s >= self.wait_s:
            return 0, f"idle for {idle_s:.0f} s >= {self.wait_s:.0f} s: scaling to zero"
        return 1, f"idle for {idle_s:.0f} s < {self.wait_s:.0f} s: keeping one replica before zero"
