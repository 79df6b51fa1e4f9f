"""The cluster's Grafana dashboard as code: ``strata deploy dashboard -f cluster.yaml``.

A pure function from a ``ClusterConfig`` to Grafana's dashboard JSON model, over the
series strata's components export under their real names: engines (latency histograms,
tokens, KV cache, queue), the gateway (its own latency, queue, rejections, ready replicas
per tier), the autoscaler (desired/current replicas, scale events; on the gateway's
/metrics under ``strata serve``) and stage replicas (busy ratio, queued steps). The SLOs of
the cluster file are drawn as thresholds; stage panels appear only for a pipeline tier.
``dashboard_configmap`` wraps it for Grafana's sidecar (label ``grafana_dashboard: "1"``).
"""

from __future__ import annotations

import json
from typing import Any

from strata.config import ClusterConfig

_RATE = "$__rate_interval"  # Grafana's rate window: at least four scrape intervals
_NS = 'namespace=~"$namespace"'  # every selector: one cluster's namespace, or all
_WIDTH, _HEIGHT = 8, 8  # three panels a row on Grafana's 24-column grid


def _target(expr: str, legend: str) -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend,
            "datasource": {"type": "prometheus", "uid": "${datasource}"}}


def _quantiles(histogram: str, quantiles: list[float], by: str = "") -> list[dict[str, Any]]:
    """``histogram_quantile`` of a strata histogram at each quantile, summed over replicas."""
    group = f"le{', ' + by if by else ''}"
    legend = f" {{{{{by}}}}}" if by else ""
    return [_target(f"histogram_quantile({q:g}, sum by ({group}) "
                    f"(rate({histogram}_bucket{{{_NS}}}[{_RATE}])))", f"p{100 * q:g}{legend}")
            for q in quantiles]


def _panel(title: str, targets: list[dict[str, Any]], unit: str, description: str,
           threshold: float | None = None, stack: bool = False) -> dict[str, Any]:
    """A time series panel; ``threshold`` draws an SLO line."""
    custom: dict[str, Any] = {"lineWidth": 1, "fillOpacity": 10 if stack else 0}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults: dict[str, Any] = {"unit": unit, "custom": custom}
    if threshold is not None:
        custom["thresholdsStyle"] = {"mode": "line+area"}
        defaults["thresholds"] = {"mode": "absolute", "steps": [
            {"color": "transparent", "value": None}, {"color": "red", "value": threshold}]}
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return {"type": "timeseries", "title": title, "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}},
            "targets": targets}


def _latency(config: ClusterConfig) -> list[dict[str, Any]]:
    slo = config.slos
    q = sorted({0.5, slo.percentile / 100, 0.99})
    return [
        _panel("Time to first token (engines)",
               _quantiles("strata_time_to_first_token_seconds", q), "s",
               "Streamed requests, measured at the engine; the red line is slos.ttft_s.",
               slo.ttft_s),
        _panel("Time per output token (engines)",
               _quantiles("strata_time_per_output_token_seconds", q), "s",
               "Per-request mean after the first token; the red line is slos.tpot_s.",
               slo.tpot_s),
        _panel("End-to-end latency (engines)",
               _quantiles("strata_e2e_request_latency_seconds", q), "s",
               "Request received to last token, at the engine."),
        _panel("Time to first byte (gateway)",
               _quantiles("strata_gateway_ttft_seconds", q, "model"), "s",
               "What clients see: the gateway's queue, routing and retries included.",
               slo.ttft_s),
        _panel("End-to-end latency (gateway)",
               _quantiles("strata_gateway_e2e_seconds", [0.5, 0.99], "model"), "s",
               "Request received to last byte sent, at the gateway."),
    ]


def _throughput() -> list[dict[str, Any]]:
    return [
        _panel("Tokens per second", [
            _target(f"sum by (model_name) (rate(strata_generation_tokens_total{{{_NS}}}[{_RATE}]))",
                    "generated {{model_name}}"),
            _target(f"sum by (model_name) (rate(strata_prompt_tokens_total{{{_NS}}}[{_RATE}]))",
                    "prefilled {{model_name}}"),
        ], "short", "Tokens the engines produced and prefilled, all replicas."),
        _panel("Requests per second", [
            _target(f"sum by (finish_reason) (rate(strata_requests_total{{{_NS}}}[{_RATE}]))",
                    "{{finish_reason}}"),
            _target(f"sum by (policy) (rate(strata_gateway_requests_routed_total{{{_NS}}}[{_RATE}]))",
                    "routed ({{policy}})"),
        ], "reqps", "Finished at the engines by finish reason, and routed by the gateway."),
        _panel("Prefix cache hit ratio", [
            _target(f"sum(rate(strata_prefix_cache_hits_total{{{_NS}}}[{_RATE}])) / "
                    f"sum(rate(strata_prefix_cache_queries_total{{{_NS}}}[{_RATE}]))", "all"),
        ], "percentunit", "Prompt tokens served from the prefix cache, over those looked up."),
    ]


def _load() -> list[dict[str, Any]]:
    return [
        _panel("KV cache usage", [
            _target(f"strata_kv_cache_usage_ratio{{{_NS}}}", "{{instance}}"),
        ], "percentunit", "Fraction of each replica's KV blocks in use."),
        _panel("Queue", [
            _target(f"sum by (model_name) (strata_num_requests_waiting{{{_NS}}})",
                    "engines waiting {{model_name}}"),
            _target(f"sum by (model) (strata_gateway_queue_depth{{{_NS}}})",
                    "gateway queue {{model}}"),
        ], "short", "Sequences waiting at the engines, requests held at the gateway."),
        _panel("Running", [
            _target(f"strata_num_requests_running{{{_NS}}}", "{{instance}}"),
            _target(f"sum(strata_gateway_requests_in_flight{{{_NS}}})", "gateway in flight"),
        ], "short", "Sequences in each engine's running batch; requests the gateway proxies."),
    ]


def _scaling() -> list[dict[str, Any]]:
    return [
        _panel("Replicas per tier", [
            _target(f"max by (tier) (strata_tier_replicas{{{_NS}}})", "ready {{tier}}"),
            _target(f"max by (tier) (strata_autoscaler_desired_replicas{{{_NS}}})",
                    "desired {{tier}}"),
            _target(f"max by (tier) (strata_autoscaler_current_replicas{{{_NS}}})",
                    "current {{tier}}"),
        ], "short", "Ready replicas the gateway routes to; what the autoscaler asked for."),
        _panel("Scaling decisions", [
            _target(f"sum by (tier, direction) "
                    f"(increase(strata_autoscaler_scale_events_total{{{_NS}}}[{_RATE}]))",
                    "{{tier}} {{direction}}"),
            _target(f"sum by (tier, stage) "
                    f"(increase(strata_autoscaler_skipped_ticks_total{{{_NS}}}[{_RATE}]))",
                    "{{tier}} skipped at {{stage}}"),
        ], "short", "Decisions that changed a tier's replica count, and ticks without one."),
    ]


def _errors() -> list[dict[str, Any]]:
    return [
        _panel("Gateway rejections", [
            _target(f"sum by (reason) (rate(strata_gateway_rejected_total{{{_NS}}}[{_RATE}]))",
                    "{{reason}}"),
        ], "reqps", "Requests the gateway answered itself with an error, by reason.",
            stack=True),
        _panel("Upstream errors and retries", [
            _target(f"sum by (kind) "
                    f"(rate(strata_gateway_upstream_errors_total{{{_NS}}}[{_RATE}]))", "{{kind}}"),
            _target(f"sum(rate(strata_gateway_retries_total{{{_NS}}}[{_RATE}]))", "retries"),
            _target(f"sum(rate(strata_gateway_client_disconnects_total{{{_NS}}}[{_RATE}]))",
                    "client disconnects"),
        ], "reqps", "Failed attempts at replicas, requests re-sent, clients that left."),
        _panel("Engine request errors", [
            _target(f"sum by (status) (rate(strata_request_errors_total{{{_NS}}}[{_RATE}]))",
                    "{{status}}"),
        ], "reqps", "Requests an engine refused, by HTTP status.", stack=True),
    ]


def _stages() -> list[dict[str, Any]]:
    return [
        _panel("Stage busy ratio", [
            _target(f"strata_stage_busy_ratio{{{_NS}}}", "{{stage}} {{instance}}"),
        ], "percentunit", "Fraction of recent wall time each stage replica spent computing; "
                          "the busiest stage bounds the pipeline."),
        _panel("Stage queued steps", [
            _target(f"strata_stage_queued_steps{{{_NS}}}", "{{stage}} {{instance}}"),
        ], "short", "Micro-batches waiting for each stage replica's compute."),
        _panel("Stage tokens per second", [
            _target(f"sum by (stage) (rate(strata_stage_tokens_total{{{_NS}}}[{_RATE}]))",
                    "{{stage}}"),
        ], "short", "Tokens run through each stage's layers."),
    ]


def _layout(rows: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Rows of panels on Grafana's grid, with unique panel ids."""
    out: list[dict[str, Any]] = []
    y = 0
    for title, panels in rows:
        out.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        for i, p in enumerate(panels):
            p["gridPos"] = {"h": _HEIGHT, "w": _WIDTH, "x": (i % 3) * _WIDTH,
                            "y": y + (i // 3) * _HEIGHT}
            out.append(p)
        y += -(-len(panels) // 3) * _HEIGHT
    for i, p in enumerate(out, start=1):
        p["id"] = i
    return out


def dashboard(cluster: ClusterConfig, namespace: str | None = None) -> dict[str, Any]:
    """Grafana's dashboard JSON model for the cluster (import it, or load it as a ConfigMap).

    ``namespace`` (default: ``platform.namespace``) is the one the dashboard opens on when
    the cluster runs on Kubernetes; a local cluster's series have none, so it opens on all.
    """
    on_kubernetes = namespace is not None or cluster.platform.kind == "kubernetes"
    namespace = namespace or cluster.platform.namespace
    rows = [("Latency", _latency(cluster)), ("Throughput", _throughput()), ("Load", _load()),
            ("Scaling", _scaling()), ("Errors", _errors())]
    if any(t.kind == "stages" for t in cluster.tiers.values()):
        rows.append(("Pipeline stages", _stages()))
    ns_var = {"name": "namespace", "label": "Namespace", "type": "query",
              "datasource": {"type": "prometheus", "uid": "${datasource}"},
              "query": {"query": "label_values(strata_num_requests_running, namespace)",
                        "refId": "namespaces"},
              "refresh": 2, "includeAll": True, "allValue": ".*", "multi": False,
              # Local clusters' series have no namespace label: "All" matches them.
              "current": ({"text": namespace, "value": namespace}
                          if on_kubernetes
                          else {"text": "All", "value": "$__all"})}
    return {
        "uid": f"strata-{namespace}"[:40], "title": f"strata ({namespace})",
        "tags": ["strata", "llm-serving"], "timezone": "browser", "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            ns_var,
        ]},
        "annotations": {"list": []},
        "panels": _layout(rows),
    }


def dashboard_configmap(cluster: ClusterConfig, namespace: str) -> dict[str, Any]:
    """The dashboard in a ConfigMap that Grafana's sidecar loads (``grafana_dashboard: "1"``)."""
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "strata-dashboard", "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "strata",
                                "app.kubernetes.io/component": "dashboard",
                                "grafana_dashboard": "1"}},
        "data": {"strata.json": json.dumps(dashboard(cluster, namespace), indent=2,
                                           sort_keys=True)},
    }
