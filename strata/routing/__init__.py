"""Pure routing policies: ``pick(request, snapshot) -> replica``.

No clock, socket or file in here: the gateway and the simulator build the same
RouteRequest and Snapshot and call the same functions.
"""

from __future__ import annotations

from strata.routing.policies import Policy
from strata.routing.prompt import PromptError, PromptEstimator
from strata.routing.registry import DEFAULT_POLICY, make_policy, policy_names
from strata.routing.types import Demand, ReplicaState, RouteRequest, Snapshot

__all__ = [
    "DEFAULT_POLICY",
    "Demand",
    "Policy",
    "PromptError",
    "PromptEstimator",
    "ReplicaState",
    "RouteRequest",
    "Snapshot",
    "make_policy",
    "policy_names",
]
