"""``strata serve``: the gateway, the replicas and the autoscaler of one cluster file, in one
asyncio process; ``strata status``: what that process is doing, as tables.

Wiring: the platform (local processes) runs the tier's replicas; an endpoint feed copies
``platform.endpoints(tier)`` into the gateway's replica set whenever it changes (and into a
Prometheus file_sd file when configured); the gateway's activator hook asks the autoscaler
for a replica when a request arrives at a tier with none; the autoscaler loop observes,
decides and calls ``platform.scale``. A thin ASGI front over the gateway adds what the
cluster needs from it: an arrivals counter, the autoscaler's series on ``/metrics`` and
``GET /admin/status``. Ctrl-C (SIGINT) or SIGTERM stops the loop, the gateway and every
replica; a second Ctrl-C kills the replicas at once.
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
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from strata.autoscale.loop import Autoscaler
from strata.autoscale.observe import Observer, PrometheusSource, ScrapeSource, SignalSource
from strata.autoscale.registry import build_policy
from strata.cluster_status import render_status, status_payload
from strata.config import ClusterConfig, load_cluster_config
from strata.gateway.app import Gateway, GatewayConfig, create_app
from strata.gateway.auth import ApiKeys
from strata.gateway.proxy import ProxyConfig
from strata.gateway.ratelimit import Limits
from strata.gateway.replicas import ReplicaSetConfig
from strata.platform.base import Platform
from strata.platform.local import LocalPlatform

log = logging.getLogger("strata.cluster")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_GENERATION = ("/v1/completions", "/v1/chat/completions")


def gateway_config(config: ClusterConfig, api_keys: ApiKeys | None) -> GatewayConfig:
    """The gateway's settings from the cluster file (no static replicas: the platform feeds them)."""
    g = config.gateway
    return GatewayConfig(
        replicas=(), tier=config.tier_name, policy=config.routing.policy,
        policy_params=dict(config.routing.params),
        replica_set=ReplicaSetConfig(poll_interval_s=g.poll_interval_s,
                                     health_interval_s=g.health_interval_s,
                                     connect_timeout_s=g.connect_timeout_s,
                                     read_timeout_s=g.read_timeout_s,
                                     eject_after_failures=g.eject_after_failures),
        proxy=ProxyConfig(max_retries=g.max_retries, hold_timeout_s=g.hold_timeout_s),
        api_keys=api_keys, default_limits=Limits(rpm=g.rate_limit_rpm, tpm=g.rate_limit_tpm),
        max_body_bytes=g.max_body_bytes, max_in_flight_per_model=g.max_in_flight_per_model,
        max_queued_per_model=g.max_queued_per_model, queue_timeout_s=g.queue_timeout_s)


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


class ClusterFront:
    """ASGI app in front of the gateway: counts arrivals, adds /admin/status and series."""

    def __init__(self, gateway: Gateway, tier: str, registry: CollectorRegistry,
                 status: Callable[[], dict[str, Any]]) -> None:
        """``registry`` holds the cluster's own series (arrivals, autoscaler)."""
        self.gateway = gateway
        self.registry = registry
        self.status = status
        self.arrivals = Counter("strata_cluster_requests_received",
                                "Generation requests received by the gateway.", ["tier"],
                                registry=registry).labels(tier=tier)

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
            if path in _GENERATION and scope["method"] == "POST":
                self.arrivals.inc()
            elif path == "/metrics":
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
                 api_keys: ApiKeys | None = None) -> None:
        """Build every part; nothing runs before ``run``."""
        self.config = config
        self.tier = config.tier_name
        self.platform = platform or LocalPlatform.from_config(config)
        self.registry = CollectorRegistry()
        self.registry.register(_PlatformCollector(self.platform, list(config.tiers)))
        self.gateway = create_app(gateway_config(config, api_keys), on_demand=self._on_demand)
        self.front = ClusterFront(self.gateway, self.tier, self.registry, self._status)
        self.http = httpx.AsyncClient(timeout=config.prometheus.query_timeout_s)
        source: SignalSource
        if config.prometheus.url is not None:
            custom = {n: t.custom_metrics for n, t in config.tiers.items() if t.custom_metrics}
            source = PrometheusSource(config.prometheus.url, self.http,
                                      config.autoscaler.window_s, custom)
        else:
            source = ScrapeSource(self.front.gateway_metrics, self.http,
                                  config.autoscaler.window_s)
        policies = {name: build_policy(config.autoscaling_for(name))
                    for name, tier in config.tiers.items() if tier.autoscaling is not None}
        self.autoscaler = Autoscaler(
            self.platform, Observer(self.platform, source, self.http), policies,
            period_s=config.autoscaler.period_s, source=source.name,
            max_replicas={n: t.max_replicas for n, t in config.tiers.items()},
            registry=self.registry, history=config.autoscaler.history,
            decision_log=config.autoscaler.decision_log)
        self.url = f"http://{config.gateway.host}:{config.gateway.port}"
        self.started_at = time.time()

    async def _on_demand(self, tier: str) -> None:
        """The gateway's activator: a replica for a tier with none ready, within the hold."""
        hold = self.config.gateway.hold_timeout_s
        deadline = time.monotonic() + hold
        await self.autoscaler.activate(tier, hold)
        while self.gateway.replicas.ready_count() == 0 and time.monotonic() < deadline:
            await self.gateway.replicas.wait_changed(0.5)  # the feed and a health check

    def _status(self) -> dict[str, Any]:
        return status_payload(self)

    async def _feed_endpoints(self) -> None:
        """Keep the gateway's replica set (and Prometheus' targets) equal to the platform's."""
        last: list[str] | None = None
        last_targets: list[str] | None = None
        while True:
            urls = [e.url for e in self.platform.endpoints(self.tier)]
            if urls != last:
                await self.gateway.set_endpoints(urls)
                last = urls
            targets = sorted(r.url.removeprefix("http://") for r in
                             self.platform.replicas(self.tier) if r.url is not None
                             and r.phase in ("ready", "unready", "draining"))
            if targets != last_targets and self.config.prometheus.targets_file is not None:
                self._write_targets(self.config.prometheus.targets_file, targets)
                last_targets = targets
            await self.platform.wait_changed(0.5)

    def _write_targets(self, path: Path, engines: list[str]) -> None:
        gateway = self.url.removeprefix("http://")
        groups = [{"targets": [gateway], "labels": {"tier": self.tier, "role": "gateway"}},
                  {"targets": engines, "labels": {"tier": self.tier, "role": "engine"}}]
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
            for name, tier in self.config.tiers.items():
                await self.platform.scale(name, tier.initial_replicas)
            tasks.append(asyncio.create_task(self._feed_endpoints(), name="endpoint feed"))
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
            server.should_exit = True
            await asyncio.gather(serving, return_exceptions=True)
            await self.platform.close()
            await self.http.aclose()


def _describe(cluster: Cluster) -> str:
    cfg = cluster.config
    tier = cfg.tiers[cluster.tier]
    scaling = "fixed" if tier.autoscaling is None else (
        f"{tier.autoscaling.policy} [{tier.min_replicas}..{tier.max_replicas}] every "
        f"{cfg.autoscaler.period_s:g} s from {cluster.autoscaler.source}")
    logs = getattr(cluster.platform, "log_dir", None)
    return (f"strata cluster: gateway {cluster.url} (routing {cfg.routing.policy}); tier "
            f"{cluster.tier}: {tier.initial_replicas} replica(s), {scaling}"
            + (f"; replica logs in {logs}" if logs else ""))


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
    keys = ApiKeys.load(config.gateway.api_keys_file, os.environ.get("STRATA_API_KEYS"))
    asyncio.run(_serve(Cluster(config, api_keys=keys)))


async def _serve(cluster: Cluster) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    presses = 0

    def on_signal() -> None:
        nonlocal presses
        presses += 1
        if presses > 1 and isinstance(cluster.platform, LocalPlatform):
            cluster.platform._kill_all_now()  # a second Ctrl-C: no more waiting
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
