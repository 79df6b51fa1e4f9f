"""``strata controller -f cluster.yaml``: the autoscaler loop in-cluster, as the strata controller.

The same observe -> decide -> scale loop as ``strata serve`` (``strata.autoscale.loop``),
with the Kubernetes platform and no gateway: replicas are the pods of each tier's
Deployment, their load comes from each pod's ``/load``, and tier signals (arrivals,
queue, TTFT) from Prometheus when ``prometheus.url`` is set, else from the gateway's
``/metrics`` at ``--gateway-url`` (without either, only per-replica metrics are known).
Nothing is scaled at start: the Deployments' ``spec.replicas`` are adopted, and a count
outside a tier's bounds is corrected by its policy on the first tick. SIGTERM or SIGINT
stops the loop; the pods keep running. With ``--metrics-port`` the loop's series
(desired/current replicas, scale events, skipped ticks) are served on ``/metrics`` there,
as ``strata serve`` serves them on the gateway's.

A stage pipeline's later stages scale as under ``strata serve``: each on its busy ratio,
only the bottleneck growing in a tick. Stage replicas join the head themselves
(``--join``), so the controller only scales them and drains the ones it removes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import httpx
from prometheus_client import CollectorRegistry, start_http_server

from strata.autoscale.loop import Autoscaler, TierObserver
from strata.autoscale.observe import Observer, PrometheusSource, ScrapeSource, SignalSource
from strata.autoscale.registry import build_policy
from strata.autoscale.types import AutoscalingPolicy
from strata.config import ClusterConfig
from strata.platform.kubernetes import KubernetesPlatform, pipeline_tiers
from strata.stages.scaling import PipelineObservers, StageObserver, pipeline_policies

log = logging.getLogger("strata.controller")


def _gateway_metrics(http: httpx.AsyncClient, url: str | None) -> Callable[[], Awaitable[str]]:
    async def fetch() -> str:
        if url is None:
            return ""  # no gateway to read: tier signals stay empty
        resp = await http.get(url.rstrip("/") + "/metrics")
        resp.raise_for_status()
        return resp.text

    return fetch


async def run_controller(config: ClusterConfig, stop: asyncio.Event, *,
                         gateway_url: str | None = None,
                         internal_token: str | None = None,
                         platform: KubernetesPlatform | None = None,
                         metrics_port: int | None = None,
                         metrics_host: str = "0.0.0.0") -> None:  # noqa: S104  # nosec B104 - a pod's port
    """Run the autoscaler against the cluster's Deployments until ``stop`` is set.

    ``metrics_port``: serve the loop's Prometheus series on ``/metrics`` there (0: any).
    """
    if config.platform.kind != "kubernetes":
        raise ValueError("strata controller drives Kubernetes Deployments; set platform.kind: "
                         "kubernetes in the cluster file (strata serve runs local replicas)")
    platform = platform or KubernetesPlatform.from_config(config, internal_token=internal_token)
    http = httpx.AsyncClient(timeout=config.prometheus.query_timeout_s)
    task: asyncio.Task[None] | None = None
    registry = CollectorRegistry()
    exporter = None
    try:
        if metrics_port is not None:
            exporter, _ = start_http_server(metrics_port, metrics_host, registry)
        await platform.start()
        source: SignalSource
        # Several tiers share the gateway's series: each tier reads its own model's.
        models = {t: (config.served_model(t),) for t in config.tiers} \
            if len(config.tiers) > 1 else None
        if config.prometheus.url is not None:
            custom = {n: t.custom_metrics for n, t in config.tiers.items() if t.custom_metrics}
            source = PrometheusSource(config.prometheus.url, http, config.autoscaler.window_s,
                                      custom, models=models)
        else:
            source = ScrapeSource(_gateway_metrics(http, gateway_url), http,
                                  config.autoscaler.window_s, models=models)
        policies: dict[str, AutoscalingPolicy] = {
            name: build_policy(config.autoscaling_for(name))
            for name, tier in config.tiers.items() if tier.autoscaling is not None}
        observer: TierObserver = Observer(platform, source, http, registry=registry)
        max_replicas = {n: t.max_replicas for n, t in config.tiers.items()}
        pipeline = pipeline_tiers(config)
        if pipeline and config.pipeline_tier is not None:  # each later stage on its busy
            stages = StageObserver(platform, http)             # ratio, the bottleneck first
            policies.update(pipeline_policies(
                pipeline, config.tiers[config.pipeline_tier].stage_scaling, stages))
            observer = PipelineObservers(observer, stages,
                                         {t.name for t in pipeline if not t.head})
            max_replicas.update({t.name: t.max_replicas for t in pipeline})
        autoscaler = Autoscaler(
            platform, observer, policies,
            period_s=config.autoscaler.period_s, source=source.name,
            max_replicas=max_replicas,
            registry=registry, history=config.autoscaler.history,
            decision_log=config.autoscaler.decision_log)
        log.info("strata controller: namespace %s, tiers %s, %s every %g s",
                 config.platform.namespace,
                 ", ".join(f"{n} ({platform.tiers_[n].deployment}: {platform.desired(n)})"
                           for n in platform.tiers()),
                 ", ".join(f"{n}: {p.name}" for n, p in policies.items()) or "no autoscaling",
                 config.autoscaler.period_s)
        if policies:
            task = asyncio.create_task(autoscaler.run(), name="autoscaler")
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *([task] if task else [])],
                                     return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task is not None and task in done:
            task.result()  # the loop died: raise its error
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await platform.close()
        await http.aclose()
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()


def serve_controller(config: ClusterConfig, *, gateway_url: str | None = None,
                     internal_token: str | None = None,
                     metrics_port: int | None = None) -> None:
    """Run the controller until SIGTERM/SIGINT (the process entry point)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_controller(config, stop, gateway_url=gateway_url,
                             internal_token=internal_token, metrics_port=metrics_port)

    asyncio.run(main())
