"""The gateway's tiers: one replica set, routing policy and proxy per tier, chosen by model.

A cluster file may hold several tiers, each serving its own model. Each tier gets a
``TierLane``: its own ``ReplicaSet`` (pollers, activation when it has no replica),
its own policy instance (policies keep per-snapshot caches) and demand tracker, and its
own ``Proxy``. ``TierLanes.for_model`` maps a request's ``model`` to its lane: the tier
that serves that name by configuration, else one whose replicas report it (a name a
replica added at runtime), else 404 in the OpenAI format with vLLM's message. A gateway
with one tier sends everything there and lets its proxy decide, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from strata.gateway.demand import DemandTracker
from strata.gateway.metrics import GatewayMetrics
from strata.gateway.proxy import Proxy, ProxyConfig, model_not_found
from strata.gateway.replica_record import ReplicaSetConfig
from strata.gateway.replica_set import OnDemand, ReplicaSet
from strata.routing.prompt import PromptEstimator
from strata.routing.registry import make_policy


@dataclass(frozen=True)
class TierRoute:
    """One tier behind the gateway: its name, the models it serves, its static replicas."""

    name: str
    served_models: tuple[str, ...] = ()  # listed on /v1/models and routed here by name
    replicas: tuple[str, ...] = ()


class TierLane:
    """Everything the gateway keeps per tier."""

    def __init__(self, route: TierRoute, *, policy: str, policy_params: dict[str, Any],
                 replica_set: ReplicaSetConfig, proxy: ProxyConfig,
                 estimator: PromptEstimator, demand_tau_s: float, metrics: GatewayMetrics,
                 on_demand: OnDemand | None) -> None:
        """Build the lane; its replicas start polling on ``replicas.set_endpoints``."""
        self.name = route.name
        self.route = route
        self.policy = make_policy(policy, **policy_params)
        self.replicas = ReplicaSet(route.name, replica_set, metrics, on_demand,
                                   estimator.chunk_tokens, route.served_models,
                                   chunk_bytes=estimator.chunk_bytes)
        threshold = int(getattr(self.policy, "threshold_tokens", 1024))
        self.proxy = Proxy(self.replicas, self.policy, metrics, proxy,
                           DemandTracker(threshold, demand_tau_s))
        self.arrivals = metrics.arrivals.labels(tier=route.name)
        metrics.in_flight.labels(tier=route.name).set_function(self.in_flight)

    def in_flight(self) -> int:
        """Requests this gateway is proxying to the tier now."""
        return sum(r.in_flight for r in self.replicas.replicas.values())

    def serves(self, model: str) -> bool:
        """Whether ``model`` is configured here or reported by one of the replicas."""
        return model in self.replicas.served_models or any(
            model in r.models for r in self.replicas.replicas.values())


class TierLanes:
    """The gateway's lanes by tier name, in configuration order (the first is the default)."""

    def __init__(self, routes: tuple[TierRoute, ...], make: Callable[[TierRoute], TierLane]
                 ) -> None:
        """``make`` builds one lane; every lane's metric labels cover all lanes' models."""
        self.lanes = {r.name: make(r) for r in routes}
        self.default = next(iter(self.lanes.values()))
        for lane in self.lanes.values():
            lane.replicas.models_in_use = self.known_models

    def __iter__(self) -> Any:
        return iter(self.lanes.values())

    def __len__(self) -> int:
        return len(self.lanes)

    def __getitem__(self, tier: str) -> TierLane:
        return self.lanes[tier]

    def known_models(self) -> frozenset[str]:
        """Model names configured or reported anywhere behind this gateway."""
        return frozenset().union(*(lane.replicas.known_models() for lane in self))

    def for_model(self, model: str) -> TierLane:
        """The lane a request for ``model`` goes to; GatewayError 404 when none serves it.

        No model (or one tier only) means the default tier; with one tier its proxy still
        refuses a model it knows it does not serve.
        """
        if len(self.lanes) == 1 or not model:
            return self.default
        for lane in self:
            if model in lane.replicas.served_models:
                return lane
        for lane in self:
            if lane.serves(model):
                return lane
        raise model_not_found(model)

    def model_cards(self) -> list[dict[str, Any]]:
        """/v1/models: every tier's cards, each id once."""
        seen: dict[str, dict[str, Any]] = {}
        for lane in self:
            for card in lane.replicas.model_cards():
                seen.setdefault(str(card.get("id")), card)
        return list(seen.values())
