"""Monitoring objects: a ServiceMonitor over every strata ``/metrics``, and the dashboard.

Engines, the stage head, stage replicas and the gateway all serve Prometheus text on
``GET /metrics`` of their HTTP port (the strata controller on its ``metrics`` port), and none of them gates it with the internal token
(only admin calls such as ``/drain`` want it), so the ServiceMonitor needs no bearer
token or header. What stands between Prometheus and an engine is the NetworkPolicy, which
lets the monitoring namespace in (``strata.deploy.render.monitoring_peer``). Each target
carries the Service's ``strata/tier`` label as ``strata_tier``.
"""

from __future__ import annotations

import math
from typing import Any

from strata.config import ClusterConfig
from strata.deploy.objects import METRICS_PATH, RenderOptions, labels, meta

SERVICE_MONITOR = "strata"
DASHBOARD_CONFIG_MAP = "strata-dashboard"
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


def monitoring_objects(config: ClusterConfig, opts: RenderOptions) -> list[dict[str, Any]]:
    """The ServiceMonitor (unless turned off)."""
    return [service_monitor(config, opts)] if opts.service_monitor else []
