"""The gateway's Prometheus metrics, in one registry per gateway (several may share a process).

Names carry their units; label children on the hot path are cached, because a
``labels(...)`` lookup costs microseconds that a sub-millisecond proxy cannot spare.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Routing decisions take microseconds; TTFT and E2E span milliseconds to minutes.
_DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    """All gateway series; ``render()`` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, policy: str) -> None:
        """Register every series in a fresh registry; ``policy`` labels routing series."""
        self.policy = policy
        r = self.registry = CollectorRegistry()
        # Arrivals, before any check: the autoscaler's demand signal (arrival rate, the
        # capacity it learns) reads it, under `strata serve` and from a standalone gateway.
        self.arrivals = Counter("strata_cluster_requests_received",
                                "Generation requests received by the gateway.", ["tier"],
                                registry=r)
        self.routed = Counter("strata_gateway_requests_routed", "Requests sent to a replica.",
                              ["replica", "policy"], registry=r)
        self.decision = Histogram(
            "strata_gateway_routing_decision_seconds", "Time to build the snapshot and pick.",
            ["policy"], buckets=_DECISION_BUCKETS, registry=r).labels(policy=policy)
        self.ttft = Histogram("strata_gateway_ttft_seconds",
                              "Gateway-side time from request received to first byte sent.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("strata_gateway_e2e_seconds",
                             "Gateway-side time from request received to last byte sent.",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter(
            "strata_gateway_upstream_errors", "Failed upstream attempts by kind.",
            ["replica", "kind"], registry=r)
        self.retries = Counter("strata_gateway_retries",
                               "Requests re-sent to another replica before their first byte.",
                               registry=r)
        self.rejected = Counter("strata_gateway_rejected",
                                "Requests answered by the gateway itself with an error.",
                                ["reason"], registry=r)
        self.disconnects = Counter("strata_gateway_client_disconnects",
                                   "Clients that left before the response ended.", registry=r)
        # Set by the gateway to a function (requests in flight are counted per replica).
        self.in_flight = Gauge("strata_gateway_requests_in_flight",
                               "Requests being proxied now.", ["tier"], registry=r)
        self.queued = Gauge("strata_gateway_queue_depth",
                            "Requests waiting for admission or for a replica.", ["model"],
                            registry=r)
        self.tier_replicas = Gauge("strata_tier_replicas", "Ready replicas per tier.", ["tier"],
                                   registry=r)
        self.replica_healthy = Gauge("strata_gateway_replica_healthy",
                                     "1 when the replica is routable, 0 when out.",
                                     ["replica"], registry=r)
        self.ejections = Counter("strata_gateway_ejections",
                                 "Times a replica was taken out after failures.", ["replica"],
                                 registry=r)
        self._routed: dict[str, Counter] = {}
        self._ttft: dict[str, Histogram] = {}
        self._e2e: dict[str, Histogram] = {}

    def forget_replica(self, replica: str) -> None:
        """Drop every series labelled with a replica that left, so churn cannot grow them."""
        self._routed.pop(replica, None)
        for family in (self.routed, self.replica_healthy, self.upstream_errors, self.ejections):
            names = family._labelnames  # prometheus_client keeps no public accessor
            for key in list(family._metrics):  # noqa: SLF001 - no public listing
                if key[names.index("replica")] == replica:
                    family.remove(*key)

    def keep_models(self, models: frozenset[str] | set[str]) -> None:
        """Drop the series labelled with a model outside ``models`` (no longer served)."""
        for family in (self.ttft, self.e2e, self.queued):
            for (model,), child in list(family._metrics.items()):  # noqa: SLF001
                waiting = family is self.queued and child._value.get() != 0  # noqa: SLF001
                if model not in models and not waiting:
                    family.remove(model)
                    self._ttft.pop(model, None)
                    self._e2e.pop(model, None)

    def routed_to(self, replica: str) -> None:
        """Count one request routed to ``replica`` by this gateway's policy."""
        child = self._routed.get(replica)
        if child is None:
            child = self._routed[replica] = self.routed.labels(replica=replica,
                                                               policy=self.policy)
        child.inc()

    def observe_ttft(self, model: str, seconds: float) -> None:
        """Record one gateway-side time to first byte."""
        child = self._ttft.get(model)
        if child is None:
            child = self._ttft[model] = self.ttft.labels(model=model)
        child.observe(seconds)

    def observe_e2e(self, model: str, seconds: float) -> None:
        """Record one gateway-side end-to-end latency."""
        child = self._e2e.get(model)
        if child is None:
            child = self._e2e[model] = self.e2e.labels(model=model)
        child.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)
