"""strata's autoscaling as native Kubernetes objects: HPAs with prometheus-adapter, or KEDA.

``--autoscaler hpa`` renders one ``autoscaling/v2`` HorizontalPodAutoscaler per scaled
tier plus the prometheus-adapter rules that expose the engines' and gateway's series as
Pods and External metrics; ``--autoscaler keda`` renders one KEDA ScaledObject per tier
whose prometheus triggers run the same queries directly. Either way the signals are the
ones the tier's ``autoscaling`` block names (``strata.autoscale``):

* ``hpa``: each metric as written: a replica metric is a Pods metric (``Utilization``
  becomes an ``AverageValue`` of the fraction), a tier metric an External one.
* ``llm`` / ``predictive``: KV usage per replica vs ``target_kv_usage``; waiting requests
  (engines' queues plus those the gateway holds) per replica vs
  ``target_waiting_per_replica``; the TTFT and TPOT SLO percentiles vs the SLOs. Not
  mapped: the learned-capacity signal and the forecast (no native counterpart), the
  queue's ``queue_max_step`` damping, and the SLOs' hold-on-scale-down (an HPA may scale
  down on a low TTFT; the largest proposal over the other metrics still wins).
* ``kpa``: concurrency (running + waiting) or finished requests per second per replica
  vs ``target * target_utilization``; the stable window becomes the scale-down window.
* stage tiers: the stage's busy ratio vs ``target_busy_pct`` (without the bottleneck-first
  coupling of the strata controller: each stage scales on its own).

``behavior`` is Kubernetes' own and carries over as is. A native HPA cannot scale to zero
(that needs the alpha ``HPAScaleToZero`` gate), so ``min_replicas: 0`` asks for KEDA,
which wakes the tier when the gateway holds a request.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from strata.autoscale.hpa import HpaConfig
from strata.autoscale.kpa import KpaConfig
from strata.autoscale.llm import LlmConfig
from strata.config import ClusterConfig
from strata.deploy.objects import GATEWAY, RenderError, RenderOptions, labels, meta
from strata.stages.tiers import StageTier

ADAPTER_CONFIG_MAP = "strata-prometheus-adapter"
_POD_RESOURCES = {"overrides": {"namespace": {"resource": "namespace"},
                                "pod": {"resource": "pod"}}}
_NAMESPACE_RESOURCES = {"overrides": {"namespace": {"resource": "namespace"}}}

# Per-replica metrics (strata.autoscale.types.REPLICA_METRICS) and the engine series
# whose sum is each one; the rest are not on an engine's /metrics.
_REPLICA_SERIES: dict[str, tuple[str, ...]] = {
    "kv_usage": ("strata_kv_cache_usage_ratio",),
    "running": ("strata_num_requests_running",),
    "waiting": ("strata_num_requests_waiting",),
    "concurrency": ("strata_num_requests_running", "strata_num_requests_waiting"),
    "prompt_tokens_per_s": ("strata_prompt_tokens_per_second",),
    "generation_tokens_per_s": ("strata_generation_tokens_per_second",),
    "tokens_per_s": ("strata_prompt_tokens_per_second", "strata_generation_tokens_per_second"),
    "stage_busy": ("strata_stage_busy_ratio",),
}


@dataclass(frozen=True)
class Signal:
    """One metric a tier scales on, in the forms an HPA (via the adapter) and KEDA take."""

    name: str  # the metric the HPA asks prometheus-adapter for
    scope: Literal["pods", "external"]
    target_type: Literal["AverageValue", "Value"]
    target: float
    query: str  # PromQL over the tier: a total for AverageValue (divided by replicas)
    rule: dict[str, Any] | None  # the prometheus-adapter rule; None: KEDA only (raw PromQL)


@dataclass(frozen=True)
class ScaledTier:
    """A tier an HPA or KEDA scales: its Deployment, bounds, signals and behaviour."""

    tier: str
    deployment: str
    min_replicas: int
    max_replicas: int
    signals: tuple[Signal, ...]
    behavior: dict[str, Any]
    scale_to_zero_grace_s: float = 30.0


class _Queries:
    """PromQL for one tier's series, scoped to its namespace and Services."""

    def __init__(self, config: ClusterConfig, tier: str, namespace: str) -> None:
        self.window = f"{math.ceil(config.autoscaler.window_s)}s"
        svc = config.platform.service_name.format(tier=tier)
        self.namespace = f'namespace="{namespace}"'
        # Selectors without the namespace: prometheus-adapter adds the HPA's own
        # (<<.LabelMatchers>>), so one rule serves every namespace; KEDA's get it here.
        self.pods = f'service="{svc}"'
        self.gateway = self.gateway_tier = f'service="{GATEWAY}"'
        # One gateway fronts every tier: with several, its series are narrowed to this
        # tier's model (queue, TTFT) or tier label (in flight), and each tier's External
        # metrics get their own names, so each adapter rule holds its own scope.
        self.suffix = ""
        if len(config.tiers) > 1 and tier in config.tiers:
            self.gateway += f',model="{config.served_model(tier)}"'
            self.gateway_tier += f',tier="{tier}"'
            self.suffix = "_" + tier.replace("-", "_")

    def keda(self, selector: str) -> str:
        """``selector`` in this tier's namespace (KEDA runs the query as written)."""
        return f"{self.namespace},{selector}"

    def replica(self, metric: str, target_type: Literal["AverageValue"], target: float
                ) -> Signal:
        """A Pods metric: the sum of ``metric``'s series per pod."""
        series = _REPLICA_SERIES.get(metric)
        if series is None:
            raise RenderError(f"replica metric {metric!r} is not on an engine's /metrics; "
                              f"use one of {', '.join(sorted(_REPLICA_SERIES))}")
        name = f"strata_{metric}"
        per_pod = " + ".join(f"sum({s}{{<<.LabelMatchers>>}}) by (<<.GroupBy>>)"
                             for s in series)
        rule = {"seriesQuery": f'{series[0]}{{namespace!="",pod!=""}}',
                "resources": _POD_RESOURCES,
                "name": {"matches": f"^{series[0]}$", "as": name}, "metricsQuery": per_pod}
        query = " + ".join(f"(sum({s}{{{self.keda(self.pods)}}}) or vector(0))"
                           for s in series)
        return Signal(name, "pods", target_type, target, query, rule)

    def rate(self, series: str, name: str, target: float) -> Signal:
        """A Pods metric: the per-second rate of a counter per pod."""
        rule = {"seriesQuery": f'{series}{{namespace!="",pod!=""}}',
                "resources": _POD_RESOURCES, "name": {"matches": f"^{series}$", "as": name},
                "metricsQuery": f"sum(rate(<<.Series>>{{<<.LabelMatchers>>}}[{self.window}]))"
                                " by (<<.GroupBy>>)"}
        query = f"sum(rate({series}{{{self.keda(self.pods)}}}[{self.window}])) or vector(0)"
        return Signal(name, "pods", "AverageValue", target, query, rule)

    def external(self, name: str, parts: list[tuple[str, str]],
                 target_type: Literal["AverageValue", "Value"], target: float) -> Signal:
        """An External metric: the sum of gauges (``(series, scope)``) over the tier."""
        name += self.suffix
        metrics_query = " + ".join(f"(sum({s}{{{sc},<<.LabelMatchers>>}}) or vector(0))"
                                   for s, sc in parts)
        query = " + ".join(f"(sum({s}{{{self.keda(sc)}}}) or vector(0))" for s, sc in parts)
        rule = {"seriesQuery": f'{parts[0][0]}{{namespace!=""}}',
                "resources": _NAMESPACE_RESOURCES,
                "name": {"matches": f"^{parts[0][0]}$", "as": name},
                "metricsQuery": metrics_query}
        return Signal(name, "external", target_type, target, query, rule)

    def quantile(self, name: str, histogram: str, scope: str, q: float,
                 target: float) -> Signal:
        """An External metric: a latency percentile over the recent window, vs an SLO."""
        def expr(sel: str) -> str:
            return (f"histogram_quantile({q:g}, sum(rate({histogram}{{{sel}}}"
                    f"[{self.window}])) by (le))")

        name += self.suffix
        rule = {"seriesQuery": f'{histogram}{{namespace!=""}}',
                "resources": _NAMESPACE_RESOURCES,
                "name": {"matches": f"^{histogram}$", "as": name},
                "metricsQuery": expr(scope + ",<<.LabelMatchers>>")}
        return Signal(name, "external", "Value", target, expr(self.keda(scope)), rule)

    def tier_metric(self, metric: str, target_type: Literal["AverageValue", "Value"],
                    target: float) -> Signal:
        """strata's tier metrics (strata.autoscale.types.TIER_METRICS) as External metrics."""
        queue = ("strata_gateway_queue_depth", self.gateway)
        in_flight = ("strata_gateway_requests_in_flight", self.gateway_tier)
        if metric == "pending_requests":
            return self.external("strata_pending_requests", [queue], target_type, target)
        if metric == "in_flight_requests":
            return self.external("strata_in_flight_requests", [in_flight], target_type,
                                 target)
        if metric == "concurrency":
            return self.external("strata_tier_concurrency", [in_flight, queue], target_type,
                                 target)
        if metric == "ttft_p90_s":
            return self.quantile("strata_ttft_p90_seconds", "strata_gateway_ttft_seconds_bucket",
                                 self.gateway, 0.9, target)
        if metric == "tpot_p90_s":
            return self.quantile("strata_tpot_p90_seconds",
                                 "strata_time_per_output_token_seconds_bucket", self.pods, 0.9,
                                 target)
        raise RenderError(f"tier metric {metric!r} is not exported by the gateway on its own "
                          "(outside strata serve); use pending_requests, in_flight_requests, "
                          "concurrency, ttft_p90_s or tpot_p90_s")


def _behavior(behavior: Any, downscale_s: int) -> dict[str, Any]:
    """``spec.behavior`` from the file's (Kubernetes' own schema), scale-down window filled."""
    out = behavior.model_dump(mode="json", by_alias=True, exclude_none=True) if behavior else {}
    for rules in out.values():
        if "tolerance" in rules:
            raise RenderError("autoscaling.behavior.*.tolerance is an alpha HPA field "
                              "(Kubernetes 1.33+, HPAConfigurableTolerance); remove it to "
                              "render native autoscalers")
    out.setdefault("scaleDown", {}).setdefault("stabilizationWindowSeconds", downscale_s)
    return out


def _engine_tier(config: ClusterConfig, tier: str, opts: RenderOptions) -> ScaledTier | None:
    t = config.tiers[tier]
    cfg = config.autoscaling_for(tier)
    if cfg is None:
        return None
    q = _Queries(config, tier, opts.namespace)
    signals: list[Signal] = []
    if isinstance(cfg, HpaConfig):
        for m in cfg.metrics:
            if m.name.startswith("custom_"):
                query = t.custom_metrics.get(m.name)
                if query is None or opts.autoscaler == "hpa":
                    raise RenderError(f"tiers.{tier}: metric {m.name} is a PromQL query of "
                                      "custom_metrics; prometheus-adapter needs a series "
                                      "rule for it: use --autoscaler keda (it runs the query)")
                target = m.value if m.type == "Value" else (
                    m.average_value if m.type == "AverageValue" else
                    (m.average_utilization or 0) / 100)
                kind: Literal["AverageValue", "Value"] = (
                    "Value" if m.type == "Value" else "AverageValue")
                signals.append(Signal(m.name.replace("_", "-"), "external", kind,
                                      float(target or 0), query, None))
            elif m.source == "replica":
                target = (m.average_utilization / 100 if m.type == "Utilization"
                          and m.average_utilization else m.average_value)
                signals.append(q.replica(m.name, "AverageValue", float(target or 0)))
            else:
                value = m.value if m.type == "Value" else m.average_value
                signals.append(q.tier_metric(m.name, "Value" if m.type == "Value"
                                             else "AverageValue", float(value or 0)))
        behavior = _behavior(cfg.behavior, cfg.downscale_stabilization_s)
    elif isinstance(cfg, LlmConfig):  # and predictive, its subclass
        signals.append(q.replica("kv_usage", "AverageValue", cfg.target_kv_usage))
        signals.append(q.external("strata_waiting", [
            ("strata_num_requests_waiting", q.pods),
            ("strata_gateway_queue_depth", q.gateway)], "AverageValue",
            cfg.target_waiting_per_replica))
        pct = cfg.slo_percentile / 100
        p = f"p{cfg.slo_percentile:g}".replace(".", "_")  # p90, p99_5: a valid metric name
        if cfg.ttft_slo_s is not None:
            signals.append(q.quantile(f"strata_ttft_{p}_seconds",
                                      "strata_gateway_ttft_seconds_bucket", q.gateway, pct,
                                      cfg.ttft_slo_s))
        if cfg.tpot_slo_s is not None:
            signals.append(q.quantile(f"strata_tpot_{p}_seconds",
                                      "strata_time_per_output_token_seconds_bucket", q.pods,
                                      pct, cfg.tpot_slo_s))
        behavior = _behavior(cfg.behavior, cfg.downscale_stabilization_s)
    else:
        assert isinstance(cfg, KpaConfig)
        if cfg.metric == "concurrency":
            signals.append(q.replica("concurrency", "AverageValue", cfg.target_value))
        else:
            signals.append(q.rate("strata_requests_total", "strata_requests_per_second",
                                  cfg.target_value))
        behavior = _behavior(None, math.ceil(cfg.stable_window_s + cfg.scale_down_delay_s))
    return ScaledTier(tier, config.platform.deployment_name.format(tier=tier),
                      t.min_replicas, t.max_replicas, tuple(signals), behavior,
                      cfg.scale_to_zero_grace_s)


def _stage_tier(config: ClusterConfig, plan: StageTier, opts: RenderOptions) -> ScaledTier:
    assert config.pipeline_tier is not None
    sc = config.tiers[config.pipeline_tier].stage_scaling
    q = _Queries(config, plan.name, opts.namespace)
    busy = q.replica("stage_busy", "AverageValue", sc.target_busy_pct / 100)
    return ScaledTier(plan.name, config.platform.deployment_name.format(tier=plan.name),
                      plan.min_replicas, plan.max_replicas, (busy,),
                      _behavior(None, sc.downscale_stabilization_s))


def scaled_tiers(config: ClusterConfig, plans: list[StageTier],
                 opts: RenderOptions) -> list[ScaledTier]:
    """The tiers an HPA or KEDA scales under ``opts.autoscaler`` ([] for ``strata``)."""
    if opts.autoscaler == "strata":
        return []
    out = [s for tier, t in config.tiers.items() if t.kind == "engine"
           and (s := _engine_tier(config, tier, opts)) is not None]
    for s in out:
        if s.min_replicas == 0 and opts.autoscaler == "hpa":
            raise RenderError(f"tiers.{s.tier}.autoscaling.min_replicas: 0 needs the alpha "
                              "HPAScaleToZero gate on a native HPA; use --autoscaler keda "
                              "(or strata), or set min_replicas: 1")
    return out + [_stage_tier(config, p, opts) for p in plans if p.autoscaled]


def quantity(value: float) -> str:
    """A Kubernetes quantity: ``2``, ``750m``."""
    if float(value).is_integer():
        return str(int(value))
    return f"{max(1, round(value * 1000))}m"


def _hpa(s: ScaledTier, namespace: str) -> dict[str, Any]:
    metrics = []
    for sig in s.signals:
        key = "averageValue" if sig.target_type == "AverageValue" else "value"
        source = {"metric": {"name": sig.name},
                  "target": {"type": sig.target_type, key: quantity(sig.target)}}
        kind = "Pods" if sig.scope == "pods" else "External"
        metrics.append({"type": kind, kind.lower(): source})
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": meta(s.deployment, namespace, labels("autoscaler", s.tier)),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": s.deployment},
                     "minReplicas": s.min_replicas, "maxReplicas": s.max_replicas,
                     "metrics": metrics, "behavior": s.behavior}}


def adapter_rules(scaled: list[ScaledTier]) -> dict[str, Any]:
    """prometheus-adapter's config: one rule per metric the HPAs ask for."""
    rules: dict[str, dict[str, Any]] = {}
    external: dict[str, dict[str, Any]] = {}
    for s in scaled:
        for sig in s.signals:
            assert sig.rule is not None
            (rules if sig.scope == "pods" else external)[sig.name] = copy.deepcopy(sig.rule)
    return {"rules": [rules[k] for k in sorted(rules)],
            "externalRules": [external[k] for k in sorted(external)]}


def prometheus_url(config: ClusterConfig, opts: RenderOptions) -> str:
    """The cluster file's Prometheus, else prometheus-operator's in the monitoring namespace."""
    return config.prometheus.url or (
        f"http://prometheus-operated.{opts.monitoring_namespace}.svc:9090")


def _scaled_object(config: ClusterConfig, s: ScaledTier, opts: RenderOptions) -> dict[str, Any]:
    server = prometheus_url(config, opts)
    triggers = [{"type": "prometheus", "name": sig.name.replace("_", "-"),
                 "metricType": sig.target_type,
                 "metadata": {"serverAddress": server, "query": sig.query,
                              "threshold": f"{sig.target:g}"}}
                for sig in s.signals]
    if s.min_replicas == 0 and not any(sig.name.startswith("strata_waiting")
                                       for sig in s.signals):
        # Something must wake a tier at zero: the requests the gateway holds for it (for
        # its own model when the gateway fronts several). The large threshold keeps this
        # trigger out of the scaling above one replica.
        q = _Queries(config, s.tier, opts.namespace)
        queue = q.keda(q.gateway)
        triggers.append({"type": "prometheus", "name": "gateway-queue",
                         "metricType": "AverageValue",
                         "metadata": {"serverAddress": server,
                                      "query": f"sum(strata_gateway_queue_depth{{{queue}}})",
                                      "threshold": str(max(1, config.gateway.max_queued_per_model)),
                                      "activationThreshold": "0"}})
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": s.deployment},
        "pollingInterval": math.ceil(config.autoscaler.period_s),
        "cooldownPeriod": math.ceil(s.scale_to_zero_grace_s),  # before scaling to zero
        "minReplicaCount": s.min_replicas, "maxReplicaCount": s.max_replicas,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": s.behavior}},
        "triggers": triggers,
    }
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": meta(s.deployment, opts.namespace, labels("autoscaler", s.tier)),
            "spec": spec}


def autoscaling_objects(config: ClusterConfig, scaled: list[ScaledTier],
                        opts: RenderOptions) -> list[dict[str, Any]]:
    """The HPAs and the adapter's ConfigMap, or the ScaledObjects; [] for ``strata``."""
    if not scaled:
        return []
    if opts.autoscaler == "keda":
        return [_scaled_object(config, s, opts) for s in scaled]
    adapter = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": meta(ADAPTER_CONFIG_MAP, opts.monitoring_namespace,
                                labels("autoscaler")),
               "data": {"config.yaml": yaml.safe_dump(adapter_rules(scaled), sort_keys=False)}}
    return [*(_hpa(s, opts.namespace) for s in scaled), adapter]
