"""The replicas of some Services as their EndpointSlices say, kept current by list + watch.

Kubernetes publishes which pods back a Service, and whether each may receive traffic, in
``discovery.k8s.io/v1`` EndpointSlices labelled ``kubernetes.io/service-name``. This module
lists them once, then watches from the list's ``resourceVersion``: each event replaces or
removes one slice. A watch that ends (its ``timeoutSeconds``, a dropped connection, an API
error) is resumed from the last ``resourceVersion`` seen, after a backoff that doubles on
consecutive failures; a 410 Gone (the version was compacted away) starts over with a fresh
list. The official client blocks, so the loop runs in its own thread and reports changes
through a callback; readers take a consistent snapshot under a lock.

An endpoint may receive traffic when its ``ready`` condition is true (unset counts as
true, as the API documents) and it is not ``terminating``. Both the Kubernetes platform
and an in-cluster gateway (``--endpoints-from kubernetes``) use this one view.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

log = logging.getLogger("strata.platform.kubernetes")

SERVICE_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    """One address of one Service as an EndpointSlice lists it."""

    service: str
    pod: str  # the targetRef's name (the pod); the address when there is none
    url: str  # http://address:port
    ready: bool
    serving: bool
    terminating: bool

    @property
    def routable(self) -> bool:
        """May receive new traffic: ready and not on its way out."""
        return self.ready and not self.terminating


def _url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address  # IPv6
    return f"http://{host}:{port}"


def slice_endpoints(obj: Any, port_name: str | None) -> list[SliceEndpoint]:
    """The endpoints of one ``V1EndpointSlice`` on the named port (else its only port)."""
    labels = (obj.metadata.labels or {}) if obj.metadata else {}
    service = labels.get(SERVICE_LABEL, "")
    ports = obj.ports or []
    port = next((p.port for p in ports if p.name == port_name and p.port), None)
    if port is None and len(ports) == 1:
        port = ports[0].port
    if port is None:
        return []
    out = []
    for ep in obj.endpoints or []:
        if not ep.addresses:
            continue
        cond = ep.conditions
        ready = cond is None or cond.ready is None or bool(cond.ready)
        serving = cond is None or cond.serving is None or bool(cond.serving)
        terminating = cond is not None and bool(cond.terminating)
        pod = ep.target_ref.name if ep.target_ref is not None and ep.target_ref.name else \
            ep.addresses[0]
        out.append(SliceEndpoint(service, pod, _url(ep.addresses[0], port), ready, serving,
                                 terminating))
    return out


class EndpointSliceWatch:
    """Every EndpointSlice of ``services`` in ``namespace``, watched from a daemon thread."""

    def __init__(self, api: client.DiscoveryV1Api, namespace: str, services: Iterable[str],
                 *, on_change: Callable[[], None] = lambda: None, port_name: str | None = "http",
                 extra_selector: str = "", watch_timeout_s: int = 300,
                 request_timeout_s: float = 10.0, backoff_s: float = 0.5,
                 backoff_max_s: float = 30.0) -> None:
        """``on_change`` is called from the watch thread after each change; keep it short."""
        self.api = api
        self.namespace = namespace
        self.services = sorted(set(services))
        self.on_change = on_change
        self.port_name = port_name
        selector = f"{SERVICE_LABEL} in ({','.join(self.services)})"
        self.selector = f"{selector},{extra_selector}" if extra_selector else selector
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.synced = threading.Event()  # set after the first successful list
        self.relists = 0  # lists done (the first one, then one after each 410 Gone)
        self._slices: dict[str, Any] = {}  # slice name -> V1EndpointSlice
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name="endpointslice-watch",
                                        daemon=True)

    def start(self) -> EndpointSliceWatch:
        """Start listing and watching in the background."""
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the watch (shuts its connection down) and wait for the thread."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        # Interrupt again until the thread is gone: a watch opened just as we stopped would
        # otherwise wait for its next event or its timeout.
        while self._thread.is_alive() and time.monotonic() < deadline:
            w = self._watch
            if w is not None:
                w.stop()
                resp = getattr(w, "_resp", None)  # unblock a read waiting for an event
                if resp is not None and hasattr(resp, "shutdown"):
                    try:
                        resp.shutdown()
                    except (ValueError, RuntimeError, OSError):
                        pass  # released or closed already
            self._thread.join(0.05)

    def endpoints(self, service: str) -> list[SliceEndpoint]:
        """Every endpoint of ``service`` now, in any condition, ordered by slice and address."""
        with self._lock:
            slices = [self._slices[k] for k in sorted(self._slices)]
        out: list[SliceEndpoint] = []
        for s in slices:
            out.extend(e for e in slice_endpoints(s, self.port_name) if e.service == service)
        return out

    # -- the watch thread -----------------------------------------------------------------

    def _list(self) -> str:
        lst = self.api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.selector,
            _request_timeout=self.request_timeout_s)
        with self._lock:
            self._slices = {s.metadata.name: s for s in lst.items}
        self.relists += 1
        self.synced.set()
        self.on_change()
        return str(lst.metadata.resource_version)

    def _apply(self, kind: str, obj: Any) -> None:
        name = obj.metadata.name
        with self._lock:
            if kind == "DELETED":
                self._slices.pop(name, None)
            elif kind in ("ADDED", "MODIFIED"):
                self._slices[name] = obj
            else:
                return
        self.on_change()

    def _run(self) -> None:
        version: str | None = None
        delay = self.backoff_s
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                w = watch.Watch()
                self._watch = w
                if self._stop.is_set():
                    break
                for event in w.stream(self.api.list_namespaced_endpoint_slice, self.namespace,
                                      label_selector=self.selector, resource_version=version,
                                      timeout_seconds=self.watch_timeout_s,
                                      _request_timeout=(self.request_timeout_s,
                                                        self.watch_timeout_s + 30)):
                    self._apply(event["type"], event["object"])
                    version = w.resource_version or version
                    delay = self.backoff_s
                version = w.resource_version or version
                delay = self.backoff_s  # a watch that ran its course is no failure
            except ApiException as err:
                if err.status == 410:
                    log.info("endpointslice watch: resourceVersion %s expired; listing again",
                             version)
                    version = None
                    continue
                log.warning("endpointslice watch: API error %s %s; retrying in %.1f s",
                            err.status, err.reason, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_max_s)
            except (Urllib3Error, OSError, ValueError) as err:
                if self._stop.is_set():
                    break
                log.warning("endpointslice watch: %s; retrying in %.1f s", err, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_max_s)
            finally:
                self._watch = None


class EndpointSliceFeed:
    """ASGI wrapper for an in-cluster gateway: its replica set follows a Service's slices.

    ``strata gateway --endpoints-from kubernetes`` wraps the gateway in this: once the app's
    lifespan has started, a watch on the Service's EndpointSlices runs, and every change
    of the routable endpoints is passed to ``app.set_endpoints`` (the same call the
    cluster's platform feed makes); the watch stops before the app's own shutdown.
    """

    def __init__(self, app: Any, api: client.DiscoveryV1Api, namespace: str,
                 services: str | dict[str, str], **watch_options: Any) -> None:
        """``services``: one Service (the gateway's one tier) or tier -> Service.

        ``watch_options`` go to ``EndpointSliceWatch`` (port name, timeouts, backoff).
        """
        self.app = app
        self.services: dict[str | None, str] = (
            {None: services} if isinstance(services, str) else dict(services))
        self.watch = EndpointSliceWatch(api, namespace, list(self.services.values()),
                                        on_change=self._changed_from_thread, **watch_options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _changed_from_thread(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._changed.set)

    async def _feed(self) -> None:
        last: dict[str | None, list[str]] = {}
        while True:
            for tier, service in self.services.items():
                urls = [e.url for e in self.watch.endpoints(service) if e.routable]
                if urls != last.get(tier):
                    log.info("service %s: %d routable endpoint(s)", service, len(urls))
                    if tier is None:
                        await self.app.set_endpoints(urls)
                    else:
                        await self.app.set_endpoints(urls, tier)
                    last[tier] = urls
            try:
                async with asyncio.timeout(5.0):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()

    async def start(self) -> None:
        """Start the watch and the feed (called once the app's lifespan has started)."""
        self._loop = asyncio.get_running_loop()
        self.watch.start()
        self._task = asyncio.create_task(
            self._feed(), name=f"endpointslices {', '.join(self.services.values())}")

    async def stop(self) -> None:
        """Stop the feed and the watch."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.to_thread(self.watch.stop)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """ASGI: everything goes to the app; lifespan events also start/stop the feed."""
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def receive_() -> Any:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.stop()
            return message

        async def send_(message: Any) -> None:
            if message["type"] == "lifespan.startup.complete":
                await self.start()
            await send(message)

        await self.app(scope, receive_, send_)
