"""Recent demand by length class, for length_bucket's group sizes.

Token work (prompt estimate + max_tokens) of each routed request is added to its class and
both classes decay exponentially with time constant ``tau_s``, so the split follows the
traffic of the last minute or so without keeping a window of requests.
"""

from __future__ import annotations

import math

from strata.routing.types import Demand, RouteRequest


class DemandTracker:
    """Exponentially decayed short/long token demand."""

    def __init__(self, threshold_tokens: int, tau_s: float = 60.0) -> None:
        """Requests with more than ``threshold_tokens`` (prompt + max_tokens) are long."""
        if tau_s <= 0:
            raise ValueError("demand tau_s must be > 0")
        self.threshold_tokens = threshold_tokens
        self.tau_s = tau_s
        self._short = 0.0
        self._long = 0.0
        self._stamp: float | None = None

    def _decay(self, now: float) -> None:
        if self._stamp is not None and now > self._stamp:
            f = math.exp(-(now - self._stamp) / self.tau_s)
            self._short *= f
            self._long *= f
        self._stamp = now

    def observe(self, request: RouteRequest, now: float) -> None:
        """Add one routed request's token work."""
        self._decay(now)
        if request.total_tokens > self.threshold_tokens:
            self._long += request.total_tokens
        else:
            self._short += request.total_tokens

    def current(self, now: float) -> Demand:
        """The decayed demand at ``now``."""
        self._decay(now)
        return Demand(short_tokens=self._short, long_tokens=self._long)
