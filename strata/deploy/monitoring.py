"""Monitoring objects: a ServiceMonitor over every strata ``/metrics``, and the dashboard.

Both are turned off together (``--no-monitoring``), with the NetworkPolicies' door for the
monitoring namespace, for a cluster without prometheus-operator.

Engines, the stage head, stage replicas and the gateway serve Prometheus text on
``GET /metrics`` of their HTTP port, the strata controller on its ``metrics`` port, and
none of them gates it with the internal token (only admin calls such as ``/drain`` want
it), so the ServiceMonitor needs no bearer token or header. What stands between Prometheus and an engine is the NetworkPolicy, which
lets the monitoring namespace in (``strata.deploy.objects.monitoring_peer``). Each target
carries the Service's ``strata/tier`` label as ``strata_tier``.
"""

from __future__ import annotations

import math
from typing import Any

from strata.config import ClusterConfig
from strata.deploy.objects import METRICS_PATH, RenderOptions, labels, meta

SERVICE_MONITOR = "strata"
# Components whose Service lists pods serving /metrics (not the stage-join Service, which
# lists the head a second time).
SCRAPED = ("engine", "gateway", "stage", "stage-head", "controller")


def service_monitor(config: ClusterConfig, opts: RenderOptions) -> dict[str, Any]:
    """prometheus-operator's ServiceMonitor for every strata Service of the namespace."""
    interval = f"{math.ceil(config.autoscaler.period_s)}s"
    ports = sorted({config.platform.port_name, "http", "metrics"})  # metrics: the controller
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": meta(SERVICE_MONITOR, opts.namespace, labels("monitoring")),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/part-of": "strata"},
                         "matchExpressions": [{"key": "app.kubernetes.io/component",
                                               "operator": "In", "values": list(SCRAPED)}]},
            "namespaceSelector": {"matchNames": [opts.namespace]},
            "endpoints": [{"port": port, "path": METRICS_PATH, "scheme": "http",
                           "interval": interval} for port in ports],
            "targetLabels": ["strata/tier"],
        },
    }


def dashboard(config: ClusterConfig, opts: RenderOptions) -> dict[str, Any]:
    """The Grafana dashboard (``strata.deploy.dashboard``) for Grafana's sidecar.

    It lives in the monitoring namespace, next to Grafana: the sidecar of the Grafana
    chart watches its own namespace unless told to search all of them.
    """
    from strata.deploy.dashboard import dashboard_configmap

    cm = dashboard_configmap(config, opts.namespace)  # opens on this cluster's namespace
    cm["metadata"]["namespace"] = opts.monitoring_namespace
    cm["metadata"]["labels"]["app.kubernetes.io/part-of"] = "strata"
    return cm


def monitoring_objects(config: ClusterConfig, opts: RenderOptions) -> list[dict[str, Any]]:
    """The ServiceMonitor and the dashboard (unless monitoring is turned off)."""
    if not opts.monitoring:
        return []
    return [service_monitor(config, opts), dashboard(config, opts)]
