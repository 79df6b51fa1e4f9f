"""``strata serve``: the gateway, the replicas and the autoscaler of one cluster file, in one
asyncio process; ``strata status``: what that process is doing, as tables.

Wiring: the platform (local processes) runs every tier's replicas; an endpoint feed copies
``platform.endpoints(tier)`` into that tier's replica set in the gateway whenever it
changes (and into a Prometheus file_sd file when configured); the gateway routes each
request by its model to the tier serving it, and its activator hook asks the autoscaler
for a replica when a request arrives at a tier with none (that tier only); the
autoscaler loop observes, decides and calls ``platform.scale`` for each tier on its own. A thin ASGI front over the gateway adds what the
cluster needs from it: the autoscaler's series on ``/metrics`` (after the gateway's own,
which count arrivals) and ``GET /admin/status``. Ctrl-C (SIGINT) or SIGTERM stops the autoscaler, drains the gateway
(``platform.drain_timeout_s``: new requests 503 + Retry-After, in-flight ones finish or
are ended), then stops every replica; a second Ctrl-C ends the drain and kills the
replicas at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from strata.autoscale.loop import Autoscaler
from strata.autoscale.observe import Observer, PrometheusSource, ScrapeSource, SignalSource
from strata.autoscale.registry import build_policy
from strata.autoscale.types import AutoscalingPolicy, TierState
from strata.cluster_status import (
    ClusterFacts,
    ReplicaFacts,
    TierFacts,
    render_status,
    status_payload,
)
from strata.config import ClusterConfig, ClusterConfigError, load_cluster_config
from strata.config import served_model_name as _served_model_name
from strata.gateway.app import Gateway, GatewayConfig, create_app
from strata.gateway.auth import ApiKeys
from strata.gateway.proxy import ProxyConfig
from strata.gateway.ratelimit import Limits
from strata.gateway.replica_set import ReplicaSetConfig
from strata.gateway.tiers import TierRoute
from strata.internal_auth import ENV_VAR as INTERNAL_TOKEN_ENV
from strata.internal_auth import generate_token, load_token
from strata.internal_auth import headers as internal_headers
from strata.platform.base import Platform
from strata.platform.local import LocalPlatform
from strata.platform.process import ProcessSpec, engine_spec
from strata.stages.scaling import BottleneckFirst, StageObserver, stage_autoscaling
from strata.stages.tiers import StageTier, cluster_stage_specs, resolve_stages, stage_tiers

log = logging.getLogger("strata.cluster")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def served_model_name(config: ClusterConfig, tier: str | None = None) -> str:
    """The model id ``tier``'s engines will report (default: the top-level model's)."""
    return config.served_model(tier) if tier is not None else _served_model_name(config.model)


def gateway_config(config: ClusterConfig, api_keys: ApiKeys | None,
                   internal_token: str | None = None) -> GatewayConfig:
    """The gateway's settings from the cluster file (no static replicas: the platform feeds them).

    ``internal_token`` lets it read the replicas' prefix reports.
    """
    g = config.gateway
    return GatewayConfig(
        tiers=tuple(TierRoute(t, (config.served_model(t),)) for t in config.tiers),
        drain_timeout_s=config.platform.drain_timeout_s,
        tier=config.default_tier, policy=config.routing.policy,
        policy_params=dict(config.routing.params),
        replica_set=ReplicaSetConfig(poll_interval_s=g.poll_interval_s,
                                     health_interval_s=g.health_interval_s,
                                     connect_timeout_s=g.connect_timeout_s,
                                     read_timeout_s=g.read_timeout_s,
                                     request_timeout_s=g.request_timeout_s,
                                     eject_after_failures=g.eject_after_failures,
                                     internal_token=internal_token),
        proxy=ProxyConfig(max_retries=g.max_retries, hold_timeout_s=g.hold_timeout_s),
        api_keys=api_keys, default_limits=Limits(rpm=g.rate_limit_rpm, tpm=g.rate_limit_tpm),
        max_body_bytes=g.max_body_bytes, max_in_flight_per_model=g.max_in_flight_per_model,
        max_queued_per_model=g.max_queued_per_model, queue_timeout_s=g.queue_timeout_s)


def platform_for(config: ClusterConfig, internal_token: str | None) -> Platform:
    """The cluster file's platform: local processes, or each tier's Kubernetes Deployment."""
    if config.platform.kind == "kubernetes":
        from strata.platform.kubernetes import KubernetesPlatform  # the client is heavy

        return KubernetesPlatform.from_config(config, internal_token=internal_token)
    return LocalPlatform.from_config(config, internal_token)


class _PlatformCollector(Collector):
    """``strata_platform_replicas{tier,phase}``: what the platform runs, read at scrape time.

    Starting and draining replicas cost as much as serving ones, so this (not the ready
    count) is what replica-seconds are integrated from.
    """

    def __init__(self, platform: Platform, tiers: list[str]) -> None:
        self.platform = platform
        self.tiers = tiers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("strata_platform_replicas", "Replicas by phase.",
                              labels=["tier", "phase"])
        for tier in self.tiers:
            phases = [r.phase for r in self.platform.replicas(tier)]
            for phase in ("starting", "ready", "unready", "draining", "stopping", "backoff"):
                g.add_metric([tier, phase], phases.count(phase))
        yield g


@dataclass(frozen=True)
class TierPlan:
    """One platform tier the cluster runs: an engine tier, or a pipeline's head or stage."""

    name: str
    kind: str  # engine | stage-head | stage
    min_replicas: int
    max_replicas: int
    initial_replicas: int
    layers: str | None = None  # stage tiers: the layer range a:b


class _TierObservers:
    """The loop's observer: stage tiers through `StageObserver`, the rest through `Observer`."""

    def __init__(self, default: Observer, stages: StageObserver | None,
                 stage_tiers: set[str]) -> None:
        self.default = default
        self.stages = stages
        self.stage_tiers = stage_tiers

    async def observe(self, tier: str, now: float) -> TierState:
        if self.stages is not None and tier in self.stage_tiers:
            return await self.stages.observe(tier, now)
        return await self.default.observe(tier, now)


class ClusterFront:
    """ASGI app in front of the gateway: adds /admin/status and the cluster's series."""

    def __init__(self, gateway: Gateway, tier: str, registry: CollectorRegistry,
                 status: Callable[[], dict[str, Any]]) -> None:
        """``registry`` holds the cluster's own series (autoscaler, platform)."""
        self.gateway = gateway
        self.registry = registry
        self.status = status

    def metrics_text(self) -> str:
        """The gateway's series followed by the cluster's."""
        return (self.gateway.metrics.render() + generate_latest(self.registry)).decode()

    async def gateway_metrics(self) -> str:
        """``metrics_text`` for the scrape source (in-process: no loopback round trip)."""
        return self.metrics_text()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route /metrics and /admin/status here, everything else to the gateway."""
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/metrics":
                await _respond(send, 200, self.metrics_text().encode(),
                               self.gateway.metrics.content_type.encode())
                return
            elif path == "/admin/status":
                await self._admin(scope, send)
                return
        await self.gateway(scope, receive, send)

    async def _admin(self, scope: Scope, send: Send) -> None:
        keys = self.gateway.keys
        if keys is not None:
            auth = next((v.decode("latin-1") for k, v in scope["headers"]
                         if k == b"authorization"), None)
            if keys.verify(auth) is None:
                body = {"error": {"message": "missing or invalid API key; send 'Authorization:"
                                  " Bearer <key>'", "type": "authentication_error",
                                  "param": None, "code": "invalid_api_key"}}
                await _respond(send, 401, json.dumps(body).encode())
                return
        await _respond(send, 200, json.dumps(self.status()).encode())


async def _respond(send: Send, status: int, body: bytes,
                   content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the cluster owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Cluster:
    """One running cluster: platform, gateway, endpoint feed and autoscaler."""

    def __init__(self, config: ClusterConfig, *, platform: Platform | None = None,
                 api_keys: ApiKeys | None = None, internal_token: str | None = None) -> None:
        """Build every part; nothing runs before ``run``.

        ``internal_token`` is the secret the cluster's services share (admin endpoints,
        stage links); a fresh one is generated for each cluster unless given. A platform
        passed in that carries its own token keeps it.
        """
        self.config = config
        self.internal_token = (getattr(platform, "internal_token", None) or internal_token
                               or generate_token())
        # The gateway's tiers are the file's (a pipeline's head is named as its tier); the
        # platform's add each later stage of the (at most one) pipeline.
        self.pipeline = config.pipeline_tier
        self.stage_tiers: list[StageTier] = []
        self.stage_view: dict[str, Any] | None = None  # the head's last GET /stages
        self._http_stages = httpx.AsyncClient(timeout=5.0)
        self.plans: list[TierPlan] = []
        specs: dict[str, ProcessSpec] = {}
        for name, t in config.tiers.items():
            if t.kind == "stages":
                stages = resolve_stages(config, name)
                self.stage_tiers = stage_tiers(name, stages)
                if platform is None and config.platform.kind == "local":
                    specs.update(cluster_stage_specs(config, name, stages,
                                                     drained=self._stage_drained))
                self.plans += [TierPlan(s.name, "stage-head" if s.head else "stage",
                                        s.min_replicas, s.max_replicas, s.initial_replicas,
                                        s.layers) for s in self.stage_tiers]
            else:
                specs[name] = engine_spec(config, name)
                self.plans.append(TierPlan(name, "engine", t.min_replicas, t.max_replicas,
                                           t.initial_replicas))
        if platform is None and config.platform.kind == "local":
            platform = LocalPlatform(specs, config.platform, internal_token=self.internal_token)
        self.platform = platform or platform_for(config, self.internal_token)
        self.registry = CollectorRegistry()
        self.registry.register(_PlatformCollector(self.platform, [p.name for p in self.plans]))
        self.gateway = create_app(gateway_config(config, api_keys, self.internal_token),
                                  on_demand=self._on_demand)
        self.front = ClusterFront(self.gateway, config.default_tier, self.registry,
                                  self._status)
        self.http = httpx.AsyncClient(timeout=config.prometheus.query_timeout_s)
        source: SignalSource
        # Several tiers share the gateway's series: each tier reads its own model's.
        models = {t: (config.served_model(t),) for t in config.tiers} \
            if len(config.tiers) > 1 else None
        if config.prometheus.url is not None:
            custom = {n: t.custom_metrics for n, t in config.tiers.items() if t.custom_metrics}
            source = PrometheusSource(config.prometheus.url, self.http,
                                      config.autoscaler.window_s, custom, models=models)
        else:
            source = ScrapeSource(self.front.gateway_metrics, self.http,
                                  config.autoscaler.window_s, models=models)
        policies: dict[str, AutoscalingPolicy] = {
            name: build_policy(config.autoscaling_for(name))
            for name, tier in config.tiers.items() if tier.autoscaling is not None}
        self.stage_observer: StageObserver | None = None
        if self.stage_tiers:
            self.stage_observer = StageObserver(self.platform, self.http)
            scaled = [t for t in self.stage_tiers if t.autoscaled]
            assert self.pipeline is not None
            sc = config.tiers[self.pipeline].stage_scaling
            for t in scaled:
                inner = build_policy(stage_autoscaling(
                    t.max_replicas, t.min_replicas, sc.target_busy_pct,
                    sc.downscale_stabilization_s))
                policies[t.name] = BottleneckFirst(inner, t.name, [s.name for s in scaled],
                                                   self.stage_observer)
        observer = _TierObservers(Observer(self.platform, source, self.http,
                                           registry=self.registry),
                                  self.stage_observer,
                                  {t.name for t in self.stage_tiers if not t.head})
        self.autoscaler = Autoscaler(
            self.platform, observer, policies,
            period_s=config.autoscaler.period_s, source=source.name,
            max_replicas={p.name: p.max_replicas for p in self.plans},
            registry=self.registry, history=config.autoscaler.history,
            decision_log=config.autoscaler.decision_log)
        self.url = f"http://{config.gateway.host}:{config.gateway.port}"
        self.started_at = time.time()

    async def _on_demand(self, tier: str) -> None:
        """The gateway's activator: a replica for a tier with none ready, within the hold."""
        hold = self.config.gateway.hold_timeout_s
        deadline = time.monotonic() + hold
        await self.autoscaler.activate(tier, hold)
        replicas = self.gateway.lanes[tier].replicas
        while replicas.ready_count() == 0 and time.monotonic() < deadline:
            await replicas.wait_changed(0.5)  # the feed and a health check

    def _status(self) -> dict[str, Any]:
        return status_payload(self.status_facts())

    def status_facts(self) -> ClusterFacts:
        """What ``strata status`` shows, gathered from the platform, gateway and autoscaler."""
        cfg = self.config
        gw = {url: r for lane in self.gateway.lanes for url, r in lane.replicas.replicas.items()}
        observed = self.stage_observer.latest if self.stage_observer is not None else {}
        tiers = []
        for plan in self.plans:
            name = plan.name
            policy = self.autoscaler.policies.get(name)
            busy = {s.replica_id: s for s in observed[name].replicas} if name in observed else {}
            replicas = []
            for r in self.platform.replicas(name):
                g = gw.get(r.url) if r.url is not None else None
                replicas.append(ReplicaFacts(r, g.in_flight if g is not None else None,
                                             g.load if g is not None else None,
                                             busy.get(r.replica_id)))
            tiers.append(TierFacts(
                name, plan.kind, plan.layers, plan.min_replicas, plan.max_replicas,
                policy.name if policy else "fixed", self.platform.desired(name),
                len(self.platform.endpoints(name)), self.autoscaler.last_error(name), replicas))
        return ClusterFacts(
            self.url, time.time() - self.started_at, cfg.routing.policy, self.autoscaler.source,
            cfg.autoscaler.period_s, cfg.slos.model_dump(), tiers,
            [d.to_dict() for d in self.autoscaler.recent()], self.stage_view)

    # -- stage pipelines --------------------------------------------------------------------

    def _head_url(self) -> str | None:
        """The pipeline head's URL while its process runs (ready or still loading)."""
        if self.pipeline is None:
            return None
        for r in self.platform.replicas(self.pipeline):
            if r.url is not None and r.phase in ("starting", "ready", "unready"):
                return r.url
        return None

    async def _head_stages(self) -> dict[str, Any] | None:
        """The head's GET /stages (replica sets, pins), or None when it does not answer."""
        url = self._head_url()
        if url is None:
            return None
        try:
            resp = await self._http_stages.get(url + "/stages")
            return resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    async def _stage_drained(self, url: str) -> bool:
        """A draining stage replica is done once the head pins nothing to it any more.

        The head forgets a draining replica when its last pinned sequence finishes, so
        "not listed, or listed as not live with nothing pinned or in flight" is drained.
        A head that cannot be reached holds no sequence anywhere: drained as well.
        """
        head = self._head_url()
        if head is None:
            return True
        try:
            view = (await self._http_stages.get(head + "/stages")).json()
        except httpx.ConnectError:
            return True
        except (httpx.HTTPError, ValueError):
            return False
        for stage in view.get("stages", []):
            for r in stage.get("replicas", []):
                if r.get("url") == url:
                    return r["state"] != "live" and r["pinned"] == 0 and r["inflight"] == 0
        return True

    async def _feed_stages(self) -> None:
        """Keep the head's replica sets equal to the stage tiers' ready replicas.

        A stage replica that the platform reports ready and the head does not list (or
        lists as lost) is registered with ``POST /stages/replicas``; after a head restart
        every one is registered again. Retiring replicas leave the platform's endpoints at
        once and drain themselves (``POST /drain`` tells the head), so they are never
        re-added. Also keeps the head's view for ``strata status``.
        """
        downstream = [t.name for t in self.stage_tiers if not t.head]
        while True:
            view = await self._head_stages()
            self.stage_view = view
            head = self._head_url()
            if view is not None and head is not None:
                known = {r["url"] for st in view.get("stages", []) for r in st.get("replicas", [])
                         if r.get("state") != "down"}
                missing = [e.url for t in downstream for e in self.platform.endpoints(t)
                           if e.url not in known]
                auth = internal_headers(self.internal_token)
                results = await asyncio.gather(*(self._http_stages.post(
                    head + "/stages/replicas", json={"url": u}, headers=auth, timeout=30)
                    for u in missing),
                    return_exceptions=True)
                for u, res in zip(missing, results, strict=True):
                    if isinstance(res, httpx.Response) and res.status_code == 200:
                        log.info("stage replica %s joined the head (%s)", u,
                                 res.json().get("stage"))
                    else:
                        why = res.text[:200] if isinstance(res, httpx.Response) else repr(res)
                        log.debug("stage replica %s not joined yet: %s", u, why)
            await self.platform.wait_changed(1.0)

    async def _feed_endpoints(self) -> None:
        """Keep each tier's replica set in the gateway (and Prometheus' targets) equal to
        the platform's."""
        last: dict[str, list[str]] = {}
        last_targets: dict[str, list[str]] | None = None
        while True:
            for tier in self.config.tiers:
                urls = [e.url for e in self.platform.endpoints(tier)]
                if urls != last.get(tier):
                    await self.gateway.set_endpoints(urls, tier)
                    last[tier] = urls
            targets = {tier: sorted(r.url.removeprefix("http://") for r in
                                    self.platform.replicas(tier) if r.url is not None
                                    and r.phase in ("ready", "unready", "draining"))
                       for tier in self.config.tiers}
            if targets != last_targets and self.config.prometheus.targets_file is not None:
                self._write_targets(self.config.prometheus.targets_file, targets)
                last_targets = targets
            await self.platform.wait_changed(0.5)

    def _write_targets(self, path: Path, engines: dict[str, list[str]]) -> None:
        gateway = self.url.removeprefix("http://")
        # One tier: the gateway's series are that tier's (custom PromQL may select them by
        # it). Several: its series carry their own tier (arrivals, in flight) or model
        # (queue, TTFT) label, so its target has none that would override them.
        labels = {"role": "gateway"}
        if len(engines) == 1:
            labels["tier"] = next(iter(engines))
        groups: list[dict[str, Any]] = [{"targets": [gateway], "labels": labels}]
        groups += [{"targets": urls, "labels": {"tier": tier, "role": "engine"}}
                   for tier, urls in engines.items()]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(groups, indent=1))
        os.replace(tmp, path)  # Prometheus never reads a half-written file

    async def run(self, stop: asyncio.Event,
                  on_ready: Callable[[Cluster], None] | None = None) -> None:
        """Serve until ``stop`` is set, then stop everything (no replica outlives this)."""
        g = self.config.gateway
        server = _Server(uvicorn.Config(self.front, host=g.host, port=g.port, lifespan="on",
                                        log_level="warning", access_log=False,
                                        timeout_keep_alive=75, timeout_graceful_shutdown=5))
        tasks: list[asyncio.Task[Any]] = []
        serving = asyncio.create_task(server.serve(), name="gateway")
        try:
            while not server.started:
                if serving.done():
                    serving.result()  # raises the bind error
                    raise RuntimeError(f"the gateway could not listen on {g.host}:{g.port}")
                await asyncio.sleep(0.05)
            port = server.servers[0].sockets[0].getsockname()[1]
            self.url = f"http://{g.host}:{port}"
            for plan in self.plans:
                await self.platform.scale(plan.name, plan.initial_replicas)
            tasks.append(asyncio.create_task(self._feed_endpoints(), name="endpoint feed"))
            if self.stage_tiers:
                tasks.append(asyncio.create_task(self._feed_stages(), name="stage feed"))
            if self.autoscaler.policies:
                tasks.append(asyncio.create_task(self.autoscaler.run(), name="autoscaler"))
            if on_ready is not None:
                on_ready(self)
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([waiter, serving, *tasks],
                                         return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for t in done:
                if t is not waiter and not t.cancelled() and t.exception() is not None:
                    log.error("%s failed: %r", t.get_name(), t.exception())
                    raise t.exception()  # type: ignore[misc]
        finally:
            log.info("stopping: autoscaler, gateway, replicas")
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if server.started:
                # New requests get 503 + Retry-After, in-flight ones get the drain timeout;
                # the replicas then stop with nothing left to drain.
                await self.gateway.drain()
            server.should_exit = True
            await asyncio.gather(serving, return_exceptions=True)
            await self.platform.close()
            await self.http.aclose()
            await self._http_stages.aclose()


def _describe(cluster: Cluster) -> str:
    cfg = cluster.config
    parts = []
    for name, tier in cfg.tiers.items():
        model = cfg.served_model(name)
        if tier.kind == "stages":
            stages = [f"{t.name} (layers {t.layers}" + (", head)" if t.head else
                      f", {t.initial_replicas} replica(s) in [{t.min_replicas}.."
                      f"{t.max_replicas}])") for t in cluster.stage_tiers]
            parts.append(f"stage pipeline {name} (model {model}): " + ", ".join(stages))
            continue
        scaling = "fixed" if tier.autoscaling is None else (
            f"{tier.autoscaling.policy} [{tier.min_replicas}..{tier.max_replicas}] every "
            f"{cfg.autoscaler.period_s:g} s from {cluster.autoscaler.source}")
        parts.append(f"tier {name} (model {model}): {tier.initial_replicas} replica(s), "
                     f"{scaling}")
    logs = getattr(cluster.platform, "log_dir", None)
    return (f"strata cluster: gateway {cluster.url} (routing {cfg.routing.policy}); "
            + "; ".join(parts) + (f"; replica logs in {logs}" if logs else ""))


def serve_cluster(config_path: Path | None = None, host: str | None = None,
                  port: int | None = None, model: str | None = None) -> None:
    """Run a cluster file (or the defaults) until Ctrl-C.

    ``host``/``port`` override the gateway's address and ``model`` the model path, so
    ``strata serve --model X --port P`` needs no file. Raises
    ``strata.config.ClusterConfigError`` for an invalid file.
    """
    config = load_cluster_config(config_path)
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        config = config.model_copy(update={"gateway": config.gateway.model_copy(update=overrides)})
    if model is not None:
        config = config.model_copy(update={"model": config.model.model_copy(
            update={"path": model})})
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe otherwise
    try:
        keys = ApiKeys.load(config.gateway.api_keys_file, os.environ.get("STRATA_API_KEYS"))
    except (ValueError, OSError) as err:
        raise ClusterConfigError(f"gateway.api_keys_file / STRATA_API_KEYS: {err}") from None
    token = load_token(None, os.environ.get(INTERNAL_TOKEN_ENV))  # else one per cluster
    asyncio.run(_serve(Cluster(config, api_keys=keys, internal_token=token)))


async def _serve(cluster: Cluster) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    presses = 0

    def on_signal() -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            cluster.gateway.stop_draining()  # a second Ctrl-C: no more waiting
            if isinstance(cluster.platform, LocalPlatform):
                cluster.platform.kill_all_now()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await cluster.run(stop, on_ready=lambda c: print(_describe(c), file=sys.stderr,
                                                         flush=True))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def print_status(url: str = "http://127.0.0.1:8000", api_key: str | None = None) -> int:
    """Print a running cluster's tiers, replicas, load and last decisions; 0, or 1 if down."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # piped or captured: do not squeeze the tables to 80
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(url.rstrip("/") + "/admin/status", headers=headers, timeout=5)
    except httpx.HTTPError as err:
        console.print(f"[red]no strata cluster answers at {url}[/red] ({err}); is "
                      "`strata serve` running there?")
        return 1
    if resp.status_code != 200:
        console.print(f"[red]{url}/admin/status answered {resp.status_code}[/red]: "
                      f"{resp.text[:300]}")
        return 1
    render_status(resp.json(), console)
    return 0
