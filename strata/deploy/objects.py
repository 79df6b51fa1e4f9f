"""The building blocks every rendered Kubernetes object shares: names, labels, pod parts.

Kept apart from ``strata.deploy.render`` so the engine, stage, autoscaling and monitoring
renderers build their objects from the same labels, security context and drain timing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from strata.config import ClusterConfig

# The Secret's name and key, not its value (see strata.deploy.render's module doc).
INTERNAL_TOKEN_SECRET = "strata-internal-token"  # nosec B105 (a name, not a secret)
INTERNAL_TOKEN_KEY = "token"  # nosec B105 (a key name, not a secret)
# A pod serves on its own IP (the Service and NetworkPolicies decide who reaches it).
POD_HOST = "0.0.0.0"  # nosec B104 (inside a pod, behind the NetworkPolicy)
POD_IP_ENV = "POD_IP"  # the downward API's status.podIP, for services that advertise it
CONFIG_MAP = "strata-cluster"
CONFIG_MOUNT = "/etc/strata"
CONFIG_FILE = "cluster.yaml"
SERVICE_ACCOUNT = "strata-controller"
GATEWAY_ACCOUNT = "strata-gateway"
GATEWAY = "strata-gateway"
CONTROLLER = "strata-controller"
ENGINE_PORT = 8000
CONTROLLER_METRICS_PORT = 9100  # the strata controller's /metrics (its only listener)
STAGE_DATA_PORT = 9000  # a stage replica's frame listener (the local platform lets it pick)
METRICS_PATH = "/metrics"
PART_OF = "strata"
PROBE_PERIOD_S = 5

Autoscaler = Literal["strata", "hpa", "keda"]


class RenderError(ValueError):
    """The cluster file cannot be rendered for Kubernetes; the message says why and how."""


@dataclass(frozen=True)
class RenderOptions:
    """What ``strata deploy render`` was asked for, besides the cluster file."""

    namespace: str = "strata"
    image: str = "strata:latest"
    autoscaler: Autoscaler = "strata"  # who scales the autoscaled tiers
    with_secret: bool = False  # render the internal-token Secret with a fresh random value
    monitoring: bool = True  # ServiceMonitor, Grafana dashboard, Prometheus let in
    monitoring_namespace: str = "monitoring"  # where Prometheus (and prometheus-adapter) run


def labels(component: str, tier: str | None = None) -> dict[str, str]:
    """The labels of one component's objects; ``tier`` adds ``strata/tier``."""
    out = {"app.kubernetes.io/name": "strata", "app.kubernetes.io/part-of": PART_OF,
           "app.kubernetes.io/component": component}
    if tier is not None:
        out["strata/tier"] = tier
    return out


def meta(name: str, namespace: str, object_labels: dict[str, str]) -> dict[str, Any]:
    """``metadata`` with a copy of the labels (the YAML dumper writes each in full)."""
    return {"name": name, "namespace": namespace, "labels": dict(object_labels)}


def token_env() -> dict[str, Any]:
    """``STRATA_INTERNAL_TOKEN`` from the Secret: admin calls and stage links need it."""
    return {"name": "STRATA_INTERNAL_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": INTERNAL_TOKEN_SECRET, "key": INTERNAL_TOKEN_KEY}}}


def pod_ip_env() -> dict[str, Any]:
    """``POD_IP`` from the downward API (``$(POD_IP)`` in a command expands to it)."""
    return {"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def container_security() -> dict[str, Any]:
    """The image runs as uid 10001 (deploy/Dockerfile) and writes only to mounted volumes."""
    return {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}


def pod_security() -> dict[str, Any]:
    """The pod-level half of ``container_security``."""
    return {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}


def grace_s(config: ClusterConfig) -> int:
    """Drain, then the stop margin: the kubelet's SIGKILL must not cut a drain short."""
    p = config.platform
    return math.ceil(p.drain_timeout_s + p.stop_timeout_s)


def http_probes(config: ClusterConfig, port_name: str) -> dict[str, Any]:
    """startup/readiness/liveness on ``/health``, mapped onto strata's health semantics."""
    p = config.platform
    health = {"path": "/health", "port": port_name}
    return {
        # Loading the model may take start_timeout_s; until then neither probe below runs.
        "startupProbe": {"httpGet": health, "periodSeconds": PROBE_PERIOD_S,
                         "timeoutSeconds": 3,
                         "failureThreshold": max(1, math.ceil(p.start_timeout_s
                                                              / PROBE_PERIOD_S))},
        # /health answers 503 while draining, so the Service drops the pod at once.
        # Two misses, not one: a busy replica may answer a probe late.
        "readinessProbe": {"httpGet": health, "periodSeconds": 2, "timeoutSeconds": 3,
                           "failureThreshold": 2},
        # Also 503 while draining: the threshold outlasts the grace period, so liveness only
        # restarts a replica that died, never one finishing its drain.
        "livenessProbe": {"httpGet": health, "periodSeconds": 10, "timeoutSeconds": 5,
                          "failureThreshold": math.ceil(grace_s(config) / 10) + 1},
    }


def strip_threads(argv: list[str], threads: int | None) -> list[str]:
    """``strata ...`` from the local command (``python -m strata.cli ...``).

    Threads the file leaves unset are left to the process (it measures the pod's cores)
    rather than divided among replicas as on one machine.
    """
    i = argv.index("strata.cli")
    out = ["strata", *argv[i + 1:]]
    if threads is None and "--threads" in out:
        j = out.index("--threads")
        del out[j:j + 2]
    return out


def replica_deployment(name: str, namespace: str, pod_labels: dict[str, str],
                       container: dict[str, Any], *, replicas: int | None,
                       grace: int, extra_labels: dict[str, str] | None = None,
                       ) -> dict[str, Any]:
    """A tier's Deployment: surge one, never below the count, no API token mounted.

    ``replicas`` None leaves ``spec.replicas`` to an HPA or KEDA (a re-apply then never
    resets what the autoscaler chose).
    """
    spec: dict[str, Any] = {
        "selector": {"matchLabels": pod_labels},
        "strategy": {"type": "RollingUpdate",
                     "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {"metadata": {"labels": {**pod_labels, **(extra_labels or {})}}, "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": grace,
            "securityContext": pod_security(),
            "containers": [container],
        }},
    }
    if replicas is not None:
        spec = {"replicas": replicas, **spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": meta(name, namespace, pod_labels), "spec": spec}


def service(name: str, namespace: str, selector: dict[str, str],
            ports: list[tuple[str, int]], *, publish_not_ready: bool = False,
            object_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A ClusterIP Service; each port targets the container port of the same name."""
    spec: dict[str, Any] = {"selector": selector, "ports": [
        {"name": n, "port": port, "targetPort": n, "protocol": "TCP"} for n, port in ports]}
    if publish_not_ready:
        spec["publishNotReadyAddresses"] = True
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": meta(name, namespace, object_labels or selector), "spec": spec}


def pdb(name: str, namespace: str, pod_labels: dict[str, str]) -> dict[str, Any]:
    """One pod of the tier at a time may be evicted (node drains, upgrades)."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(name, namespace, pod_labels),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": pod_labels}}}


def network_policy(name: str, namespace: str, component: str, selector: dict[str, str],
                   rules: list[tuple[list[dict[str, Any]], list[int]]]) -> dict[str, Any]:
    """Ingress to the pods of ``selector``: each rule lets its peers reach its ports."""
    ingress = [{"from": peers, "ports": [{"port": p, "protocol": "TCP"} for p in ports]}
               for peers, ports in rules]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta(name, namespace, labels(component)),
            "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"],
                     "ingress": ingress}}


def component_peer(component: str) -> dict[str, Any]:
    """The pods of one strata component in this namespace."""
    return {"podSelector": {"matchLabels": labels(component)}}


def monitoring_peer(opts: RenderOptions) -> list[dict[str, Any]]:
    """Prometheus' namespace, when a ServiceMonitor is rendered (it scrapes each pod)."""
    if not opts.monitoring:
        return []
    return [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": opts.monitoring_namespace}}}]
