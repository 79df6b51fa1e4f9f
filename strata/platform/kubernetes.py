"""Replicas as the pods of one Kubernetes Deployment per tier (``platform: {kind: kubernetes}``).

A stage pipeline is its head plus one tier per later stage (``pipeline_tiers``), each a
Deployment like an engine tier's; a stage pod's ``/load`` reports the sequences the head
still runs through it, so the drain below waits for those too.

The same ``Platform`` seam as ``LocalPlatform``, over the official ``kubernetes`` client:

* **scale**: the tier's Deployment ``/scale`` subresource, written with optimistic
  concurrency (a PUT carrying the ``resourceVersion`` just read; 409 Conflict: read again
  and retry). The ReplicaSet controller then creates or deletes pods.
* **endpoints**: the ready, non-terminating addresses of the tier's Service, from a watch
  on its EndpointSlices (``strata.platform.endpointslices``), minus pods being drained.
* **scale-down drains first**: victims are picked as a ReplicaSet ranks pods (unready
  first, newest first), taken out of ``endpoints`` at once, sent ``POST /drain`` (the
  engine then fails its readiness probe and refuses new requests, so the Service drops
  it), waited on until ``/load`` shows nothing running or waiting (or
  ``drain_timeout_s``), annotated ``controller.kubernetes.io/pod-deletion-cost`` with the
  lowest cost, and only then is ``spec.replicas`` lowered, so the ReplicaSet deletes
  exactly those pods.
* **drain(replica)**: the same drain, then the pod is deleted and the ReplicaSet replaces
  it (the tier keeps its count, as on the local platform).

Every API call runs in a thread (the client blocks) with a timeout; 5xx, 429 and network
errors are retried with a doubling backoff, and a tier whose writes keep failing is
retried in the background rather than failing the control loop. Times in ``Replica``
records are on this process's monotonic clock, from when the platform first saw the pod.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity
from urllib3.exceptions import HTTPError as Urllib3Error

from strata.config import ClusterConfig, PlatformOptions
from strata.internal_auth import HEADER as INTERNAL_TOKEN_HEADER
from strata.platform.base import Endpoint, Replica, ReplicaPhase
from strata.platform.endpointslices import EndpointSliceWatch, SliceEndpoint
from strata.platform.process import pick_victims
from strata.stages.tiers import StageTier, stage_tiers

log = logging.getLogger("strata.platform.kubernetes")

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
LOWEST_DELETION_COST = -(2**31)  # the annotation is an int32: this pod goes first

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KubeTier:
    """Where one tier lives: its Deployment and the Service that lists its pods."""

    deployment: str
    service: str


def api_client(options: PlatformOptions) -> client.ApiClient:
    """A client for the configured API server: in-cluster, a kubeconfig, or ``api_server``.

    ``api_server`` alone (``kubectl proxy``, a test server) loads no credentials.
    """
    cfg = client.Configuration()
    if options.api_server is not None:
        cfg.host = options.api_server.rstrip("/")
    elif options.kube_auth == "in-cluster":
        kube_config.load_incluster_config(client_configuration=cfg)
    else:
        kube_config.load_kube_config(
            config_file=str(options.kubeconfig) if options.kubeconfig else None,
            context=options.kube_context, client_configuration=cfg)
    return client.ApiClient(cfg)


def _retryable(err: BaseException) -> bool:
    if isinstance(err, ApiException):
        return err.status in (429, 500, 502, 503, 504) or err.status == 0
    return isinstance(err, (Urllib3Error, OSError, TimeoutError))


def pipeline_tiers(config: ClusterConfig) -> list[StageTier]:
    """The head and stage tiers of the cluster's pipeline, head first; [] without one.

    Only explicit layer ranges: ``stages: auto`` splits by costs measured at start-up, so
    its stage Deployments cannot be named in advance.
    """
    tier = config.pipeline_tier
    if tier is None:
        return []
    t = config.tiers[tier]
    if not isinstance(t.stages, list):
        raise ValueError(f"tiers.{tier}.stages: auto splits by costs measured at start-up, so "
                         "the stage Deployments cannot be named in advance; write the layer "
                         "ranges out (stages: [{layers: '0:15'}, {layers: '15:30'}])")
    return stage_tiers(tier, t.stages)


@dataclass(eq=False)
class _Pod:
    """What the platform knows of one pod, merged from pod lists and EndpointSlices."""

    tier: str
    name: str
    first_seen: float
    url: str | None = None
    capacity: float = 1.0
    deleting: bool = False  # deletionTimestamp set
    ready_at: float | None = None


class KubernetesPlatform:
    """The ``Platform`` of a Kubernetes namespace: one Deployment per tier."""

    def __init__(self, tiers: dict[str, KubeTier], options: PlatformOptions,
                 api: client.ApiClient, *, internal_token: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Nothing is read from the API until the first call that needs it (or ``start``)."""
        self.tiers_ = tiers
        self.options = options
        self.api = api
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.internal_token = internal_token
        self.clock = clock
        self.namespace = options.namespace
        self.watch = EndpointSliceWatch(
            client.DiscoveryV1Api(api), options.namespace, [t.service for t in tiers.values()],
            on_change=self._changed_from_thread, port_name=options.port_name,
            extra_selector=options.label_selector, watch_timeout_s=options.watch_timeout_s,
            request_timeout_s=options.api_timeout_s, backoff_s=options.api_backoff_s,
            backoff_max_s=options.api_backoff_max_s)
        self._desired: dict[str, int] = {}
        self._selectors: dict[str, str] = {}
        self._pods: dict[str, dict[str, _Pod]] = {t: {} for t in tiers}
        self._draining: set[str] = set()  # out of traffic, being drained or drained
        self._drained: set[str] = set()  # drained and ranked first for deletion
        self._kick = {t: asyncio.Event() for t in tiers}
        self._changed = asyncio.Event()
        self._refresh = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._closed = False
        self.conflicts = 0  # 409s met while writing a scale (for status and tests)

    @classmethod
    def from_config(cls, config: ClusterConfig, *, api: client.ApiClient | None = None,
                    internal_token: str | None = None) -> KubernetesPlatform:
        """Every tier of the cluster file, named by the platform's name patterns.

        A stage pipeline is its head and one tier per later stage (``pipeline_tiers``),
        each a Deployment scaled like an engine tier; the engine tiers beside it are one each.
        """
        opts = config.platform
        names = [n for n, t in config.tiers.items() if t.kind == "engine"]
        names += [t.name for t in pipeline_tiers(config)]
        tiers = {name: KubeTier(opts.deployment_name.format(tier=name),
                                opts.service_name.format(tier=name)) for name in names}
        return cls(tiers, opts, api or api_client(opts), internal_token=internal_token)

    # -- start and stop ---------------------------------------------------------------------

    async def start(self) -> None:
        """Read each tier's Deployment, list and watch its EndpointSlices, list its pods."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for tier, kt in self.tiers_.items():
            dep = await self._call(self.apps.read_namespaced_deployment, kt.deployment,
                                   self.namespace)
            labels = (dep.spec.selector.match_labels or {}) if dep.spec.selector else {}
            self._selectors[tier] = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            self._desired[tier] = int(dep.spec.replicas or 0)
        self.watch.start()
        synced = await asyncio.to_thread(self.watch.synced.wait, self.options.api_timeout_s * 3)
        if not synced:
            log.warning("EndpointSlices not listed yet; endpoints stay empty until they are")
        await self._refresh_pods()
        self._tasks = [asyncio.create_task(self._tier_loop(t), name=f"kube scale {t}")
                       for t in self.tiers_]
        self._tasks.append(asyncio.create_task(self._pod_loop(), name="kube pods"))

    async def close(self) -> None:
        """Stop watching and reconciling; the pods keep running (the cluster owns them)."""
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.watch.stop)
        if self._http is not None:
            await self._http.aclose()
        await asyncio.to_thread(self.api.close)

    # -- the Platform interface ---------------------------------------------------------

    async def scale(self, tier: str, replicas: int) -> None:
        """Ask for ``replicas`` pods; grows at once, shrinks after draining the victims."""
        if tier not in self.tiers_:
            raise KeyError(f"unknown tier {tier!r}; this platform runs {', '.join(self.tiers_)}")
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        if self._closed:
            raise RuntimeError("the platform is closed")
        await self.start()
        if replicas != self._desired[tier]:
            log.info("tier %s: scale %d -> %d", tier, self._desired[tier], replicas)
        self._desired[tier] = replicas
        self._kick[tier].set()

    def endpoints(self, tier: str) -> list[Endpoint]:
        """Ready, non-terminating endpoints of the tier's Service, minus draining pods."""
        kt = self.tiers_.get(tier)
        if kt is None:
            return []
        return [Endpoint(tier, e.pod, e.url) for e in self.watch.endpoints(kt.service)
                if e.routable and e.pod not in self._draining]

    async def drain(self, replica_id: str) -> None:
        """Drain one pod, then delete it; its ReplicaSet starts a replacement."""
        await self.start()
        tier = self._tier_of(replica_id)
        await self._drain_pod(tier, replica_id)
        await self._delete_pod(replica_id)
        deadline = self.clock() + self.options.stop_timeout_s + self.options.api_timeout_s
        while replica_id in self._pods[tier] and self.clock() < deadline:
            self._refresh.set()
            await self.wait_changed(0.5)

    def desired(self, tier: str) -> int:
        """``spec.replicas`` as last asked (as read at start before any ask)."""
        return self._desired.get(tier, 0)

    def replicas(self, tier: str) -> list[Replica]:
        """Every pod of the tier the platform knows, in any phase."""
        kt = self.tiers_.get(tier)
        if kt is None:
            return []
        by_pod = {e.pod: e for e in self.watch.endpoints(kt.service)}
        return [self._view(p, by_pod.get(p.name)) for p in self._pods[tier].values()]

    def tiers(self) -> list[str]:
        """The tiers this platform runs."""
        return list(self.tiers_)

    async def wait_changed(self, timeout_s: float) -> None:
        """Return on the next EndpointSlice or pod change, or after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        except TimeoutError:
            pass

    # -- bookkeeping --------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _changed_from_thread(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_slices)

    def _on_slices(self) -> None:
        self._refresh.set()  # a new or vanished pod: list the pods again
        self._notify()

    def _tier_of(self, replica_id: str) -> str:
        for tier, pods in self._pods.items():
            if replica_id in pods:
                return tier
        for tier, kt in self.tiers_.items():
            if any(e.pod == replica_id for e in self.watch.endpoints(kt.service)):
                return tier
        raise KeyError(f"no replica {replica_id!r}")

    def _view(self, pod: _Pod, ep: SliceEndpoint | None) -> Replica:
        phase: ReplicaPhase
        if pod.name in self._draining:
            phase = "draining"
        elif pod.deleting or (ep is not None and ep.terminating):
            phase = "stopping"
        elif ep is not None and ep.routable:
            phase = "ready"
        elif pod.ready_at is not None:
            phase = "unready"
        else:
            phase = "starting"
        return Replica(tier=pod.tier, replica_id=pod.name, phase=phase,
                       url=ep.url if ep is not None else pod.url, started_at=pod.first_seen,
                       ready_at=pod.ready_at, capacity=pod.capacity)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One API call in a thread, retried on 5xx/429/network errors with backoff."""
        delay = self.options.api_backoff_s
        attempts = 5
        for attempt in range(attempts):
            try:
                return await asyncio.to_thread(fn, *args, _request_timeout=self.options.api_timeout_s,
                                               **kwargs)
            except Exception as err:  # noqa: BLE001 - classified just below
                if not _retryable(err) or attempt == attempts - 1 or self._closed:
                    raise
                log.warning("kubernetes API %s failed (%s); retrying in %.1f s",
                            getattr(fn, "__name__", fn), _describe(err), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.options.api_backoff_max_s)
        raise AssertionError("unreachable")

    # -- pods ---------------------------------------------------------------------------

    async def _pod_loop(self) -> None:
        """List pods when the slices change, else every few seconds (new Pending pods)."""
        while not self._closed:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            # that arrives as the event fires, and the task would never end
            try:
                async with asyncio.timeout(2.0):
                    await self._refresh.wait()
            except TimeoutError:
                pass
            self._refresh.clear()
            try:
                await self._refresh_pods()
            except Exception as err:  # noqa: BLE001 - the next round retries
                log.warning("listing pods failed: %s", _describe(err))
                await asyncio.sleep(self.options.api_backoff_s)

    async def _refresh_pods(self) -> None:
        changed = False
        now = self.clock()
        for tier, kt in self.tiers_.items():
            lst = await self._call(self.core.list_namespaced_pod, self.namespace,
                                   label_selector=self._selectors[tier])
            ready = {e.pod for e in self.watch.endpoints(kt.service) if e.routable}
            known = self._pods[tier]
            seen = set()
            for item in lst.items:
                name = item.metadata.name
                seen.add(name)
                pod = known.get(name)
                if pod is None:
                    pod = known[name] = _Pod(tier, name, first_seen=now)
                    changed = True
                deleting = item.metadata.deletion_timestamp is not None
                url = self._pod_url(item)
                capacity = self._capacity(item)
                if (deleting, url, capacity) != (pod.deleting, pod.url, pod.capacity):
                    pod.deleting, pod.url, pod.capacity = deleting, url, capacity
                    changed = True
            for name in set(known) - seen:
                del known[name]
                self._draining.discard(name)
                self._drained.discard(name)
                changed = True
            for name in ready:
                pod = known.get(name)
                if pod is not None and pod.ready_at is None:
                    pod.ready_at = now
                    changed = True
        if changed:
            self._notify()

    def _pod_url(self, item: Any) -> str | None:
        ip = item.status.pod_ip if item.status else None
        if not ip:
            return None
        for c in item.spec.containers or []:
            for p in c.ports or []:
                if p.name == self.options.port_name or len(c.ports) == 1:
                    host = f"[{ip}]" if ":" in ip else ip
                    return f"http://{host}:{p.container_port}"
        return None

    def _capacity(self, item: Any) -> float:
        """The pod's request of ``capacity_resource`` over its containers (1.0 if none)."""
        total = 0.0
        for c in item.spec.containers or []:
            requests = (c.resources.requests or {}) if c.resources else {}
            if self.options.capacity_resource in requests:
                total += float(parse_quantity(requests[self.options.capacity_resource]))
        return total if total > 0 else 1.0

    # -- scaling ------------------------------------------------------------------------

    async def _tier_loop(self, tier: str) -> None:
        """Bring the Deployment to the desired count whenever asked; retry what failed."""
        delay = self.options.api_backoff_s
        while not self._closed:
            await self._kick[tier].wait()
            self._kick[tier].clear()
            try:
                await self._converge(tier)
                delay = self.options.api_backoff_s
            except Exception as err:  # noqa: BLE001 - logged, retried; never kills the loop
                log.error("tier %s: scaling to %d failed (%s); retrying in %.1f s", tier,
                          self._desired[tier], _describe(err), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.options.api_backoff_max_s)
                self._kick[tier].set()

    async def _converge(self, tier: str) -> None:
        kt = self.tiers_[tier]
        while True:
            want = self._desired[tier]
            scale = await self._call(self.apps.read_namespaced_deployment_scale,
                                     kt.deployment, self.namespace)
            have = int(scale.spec.replicas or 0)
            await self._refresh_pods()
            # Pods drained earlier whose removal has not happened (a failed scale write, or
            # the count went back up meanwhile): a drained engine serves no more, so they
            # are removed first on a scale-down and replaced otherwise.
            leftover = [n for n, p in self._pods[tier].items()
                        if n in self._drained and not p.deleting]
            if want < have:
                live = [r for r in self.replicas(tier) if not r.terminating]
                victims = pick_victims(live, have - want - len(leftover))
                await asyncio.gather(*(self._drain_pod(tier, v) for v in victims))
                await self._write_scale(tier, want)
                continue
            for name in leftover:
                log.info("pod %s: drained but still running; deleting it (it is replaced)",
                         name)
                await self._delete_pod(name)
            if have == want:
                return
            await self._write_scale(tier, want)

    async def _write_scale(self, tier: str, replicas: int) -> None:
        """``spec.replicas = replicas`` against the version just read; 409: read again."""
        kt = self.tiers_[tier]
        for _ in range(10):
            scale = await self._call(self.apps.read_namespaced_deployment_scale,
                                     kt.deployment, self.namespace)
            if scale.spec.replicas == replicas:
                return
            scale.spec.replicas = replicas
            try:
                await self._call(self.apps.replace_namespaced_deployment_scale, kt.deployment,
                                 self.namespace, scale)
                return
            except ApiException as err:
                if err.status != 409:
                    raise
                self.conflicts += 1
                log.info("tier %s: scale write conflicted (409); reading it again", tier)
        raise RuntimeError(f"deployment {kt.deployment}: 10 conflicting scale writes in a row")

    async def _drain_pod(self, tier: str, name: str) -> None:
        """Out of endpoints, ``POST /drain``, wait for idle, lowest pod-deletion-cost."""
        self._draining.add(name)
        self._notify()
        pod = self._pods[tier].get(name)
        url = pod.url if pod is not None else None
        for e in self.watch.endpoints(self.tiers_[tier].service):
            if e.pod == name:
                url = e.url
        if url is not None:
            await self._drain_requests(name, url)
        body = {"metadata": {"annotations": {DELETION_COST: str(LOWEST_DELETION_COST)}}}
        try:
            await self._call(self.core.patch_namespaced_pod, name, self.namespace, body,
                             _content_type="application/merge-patch+json")
        except ApiException as err:
            if err.status != 404:  # already gone: nothing left to rank
                raise
        self._drained.add(name)

    async def _delete_pod(self, name: str) -> None:
        try:
            await self._call(self.core.delete_namespaced_pod, name, self.namespace)
        except ApiException as err:
            if err.status != 404:  # already gone
                raise

    async def _drain_requests(self, name: str, url: str) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=2.0)
        headers = {INTERNAL_TOKEN_HEADER: self.internal_token} if self.internal_token else {}
        t0 = self.clock()
        try:
            await self._http.post(url + "/drain", headers=headers)
        except httpx.HTTPError as err:
            log.warning("pod %s: POST /drain failed (%s); removing it anyway", name, err)
            return
        idle_reads = 0
        last: dict[str, Any] = {}
        while self.clock() - t0 < self.options.drain_timeout_s:
            try:
                last = (await self._http.get(url + "/load")).json()
                idle = last.get("running") == 0 and last.get("waiting") == 0
            except (httpx.HTTPError, ValueError):
                idle = False
            idle_reads = idle_reads + 1 if idle else 0
            if idle_reads >= 2:  # two reads apart: nothing was in transit to it either
                log.info("pod %s drained in %.1f s", name, self.clock() - t0)
                return
            await asyncio.sleep(0.25)
        log.warning("pod %s still busy after %.0f s of draining (%s); removing it", name,
                    self.options.drain_timeout_s, last)


def _describe(err: BaseException) -> str:
    if isinstance(err, ApiException):
        return f"{err.status} {err.reason}"
    return f"{type(err).__name__}: {err}"
