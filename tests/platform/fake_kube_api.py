"""A fake Kubernetes API server on loopback: the one mock the test suite allows.

No Kubernetes API server can run on the test machines, so the Kubernetes platform is
tested against this HTTP server, which answers the real REST paths the official
``kubernetes`` client calls, with the real JSON shapes:

* ``/apis/apps/v1/namespaces/{ns}/deployments[/{name}[/scale]]``: GET, and PUT/PATCH of
  the scale subresource with optimistic concurrency (a PUT whose ``resourceVersion`` is
  stale gets 409 Conflict, as the real server answers);
* ``/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices``: list and watch (newline-
  delimited ``ADDED``/``MODIFIED``/``DELETED`` events; an ``ERROR`` event with code 410
  when the asked ``resourceVersion`` was compacted away);
* ``/api/v1/namespaces/{ns}/pods[/{name}]``: list, GET, PATCH (annotations), DELETE.

It also plays the controllers: a Deployment's ``spec.replicas`` is reconciled by creating
pods (a ``kubelet`` callback starts a real replica process and gives its port) or deleting
them in the ReplicaSet's order (unready first, then the lowest
``controller.kubernetes.io/pod-deletion-cost``, then the newest); a readiness probe polls
each pod's ``/health``; and an EndpointSlice controller publishes the pods with their
ready/serving/terminating conditions, one slice per distinct port as the real controller
groups endpoints. Faults are injected per request: a status (409, 500, 503) or a delay.

What it does not model: authentication, admission, field selectors, server-side apply,
pagination (``limit``/``continue``), bookmarks, and a Deployment's rollout machinery
(ReplicaSets are implicit). Tests that pass here show the platform speaks the API's
protocol; they cannot show a real cluster's timing.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"

# kubelet(pod_name) -> (port, stop): starts the pod's process; stop() ends it.
Kubelet = Callable[[str], tuple[int, Callable[[], None]]]


@dataclass
class Fault:
    """Answer the next ``times`` requests matching ``method`` and ``path`` this way."""

    method: str
    path: str  # a regular expression searched in the request path
    status: int = 500
    delay_s: float = 0.0
    times: int = 1
    watch: bool | None = None  # only watch (True) or only non-watch (False) requests


@dataclass
class _Pod:
    name: str
    namespace: str
    deployment: str
    labels: dict[str, str]
    requests: dict[str, str]
    created: float
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    annotations: dict[str, str] = field(default_factory=dict)
    port: int = 0
    stop: Callable[[], None] | None = None
    ready: bool = False
    ever_ready: bool = False
    terminating: bool = False
    terminating_since: float = 0.0
    resource_version: int = 0

    def deletion_cost(self) -> int:
        try:
            return int(self.annotations.get(DELETION_COST, "0"))
        except ValueError:
            return 0


@dataclass
class _Deployment:
    name: str
    namespace: str
    replicas: int
    match_labels: dict[str, str]
    service: str
    requests: dict[str, str]
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    resource_version: int = 0
    serial: int = 0


def _match(selector: str, labels: dict[str, str]) -> bool:
    """Equality (``a=b``, ``a==b``, ``a!=b``) and set (``a in (x,y)``) label selectors."""
    if not selector:
        return True
    for term in re.split(r",(?![^()]*\))", selector):
        term = term.strip()
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (labels.get(key) in values) != (op == "in"):
                return False
        elif m := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)", term):
            key, op, value = m.groups()
            if (labels.get(key) == value) != (op != "!="):
                return False
        else:
            raise ValueError(f"unsupported label selector term {term!r}")
    return True


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeKubeApi:
    """The fake API server and its controllers; ``url`` is where the client points."""

    def __init__(self, kubelet: Kubelet, *, probe_interval_s: float = 0.1,
                 termination_s: float = 0.3) -> None:
        """``termination_s``: how long a deleted pod stays listed as terminating."""
        self.kubelet = kubelet
        self.probe_interval_s = probe_interval_s
        self.termination_s = termination_s
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.rv = 1
        self.compacted_rv = 0  # watches from before this get 410 Gone
        self.deployments: dict[tuple[str, str], _Deployment] = {}
        self.pods: dict[tuple[str, str], _Pod] = {}
        self.slices: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # endpointslice events
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (method, path?query) of every request
        self.scale_writes: list[int] = []  # spec.replicas of every accepted scale write
        self.deleted_pods: list[str] = []
        self._stopping = threading.Event()
        self._http = httpx.Client(timeout=0.5)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._threads = [threading.Thread(target=self.server.serve_forever, daemon=True),
                         threading.Thread(target=self._controllers, daemon=True)]

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeKubeApi:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop serving, end every watch and every pod's process."""
        self._stopping.set()
        with self.changed:
            self.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        with self.lock:
            pods = list(self.pods.values())
        for p in pods:
            if p.stop is not None:
                p.stop()
        self._http.close()

    # -- test controls --------------------------------------------------------------------

    def add_deployment(self, name: str, *, namespace: str = "default", replicas: int = 0,
                       service: str | None = None, labels: dict[str, str] | None = None,
                       requests: dict[str, str] | None = None) -> None:
        """A Deployment whose pods are selected by ``labels`` and listed by ``service``."""
        with self.lock:
            d = _Deployment(name, namespace, replicas, labels or {"app": name},
                            service or name, requests or {"cpu": "1"})
            d.resource_version = self._bump()
            self.deployments[(namespace, name)] = d
            self.changed.notify_all()

    def inject(self, method: str, path: str, status: int = 500, *, delay_s: float = 0.0,
               times: int = 1, watch: bool | None = None) -> None:
        """Fail (or delay) the next ``times`` matching requests."""
        with self.lock:
            self.faults.append(Fault(method, path, status, delay_s, times, watch))

    def touch_deployment(self, name: str, namespace: str = "default") -> None:
        """Another writer changed the Deployment: its resourceVersion moves on."""
        with self.lock:
            self.deployments[(namespace, name)].resource_version = self._bump()

    def set_requests(self, pod: str, requests: dict[str, str], namespace: str = "default") -> None:
        """Give one pod different requests (e.g. after an in-place resize)."""
        with self.lock:
            self.pods[(namespace, pod)].requests = requests

    def compact(self) -> None:
        """Forget the event history: watches resuming from before now get 410 Gone."""
        with self.changed:
            self.compacted_rv = self._bump()  # every version handed out so far is too old
            self.events.clear()
            self.changed.notify_all()

    def pod_names(self, deployment: str, namespace: str = "default") -> list[str]:
        with self.lock:
            return [p.name for p in self.pods.values()
                    if p.deployment == deployment and p.namespace == namespace]

    def pod(self, name: str, namespace: str = "default") -> _Pod | None:
        with self.lock:
            return self.pods.get((namespace, name))

    def spec_replicas(self, deployment: str, namespace: str = "default") -> int:
        with self.lock:
            return self.deployments[(namespace, deployment)].replicas

    # -- controllers ----------------------------------------------------------------------

    def _bump(self) -> int:
        self.rv += 1
        return self.rv

    def _controllers(self) -> None:
        """ReplicaSet + kubelet readiness probe + EndpointSlice controller, in one loop."""
        while not self._stopping.is_set():
            self._reconcile_deployments()
            self._probe()
            self._reap()
            with self.lock:
                self._publish_slices()
            self._stopping.wait(self.probe_interval_s)

    def _reconcile_deployments(self) -> None:
        with self.lock:
            deployments = list(self.deployments.values())
        for d in deployments:
            with self.lock:
                live = [p for p in self.pods.values()
                        if p.deployment == d.name and p.namespace == d.namespace
                        and not p.terminating]
                missing = d.replicas - len(live)
                if missing < 0:
                    # ReplicaSet ranking: not ready first, lower deletion cost, newer first
                    ranked = sorted(live, key=lambda p: (p.ready, p.deletion_cost(), -p.created))
                    for p in ranked[:-missing]:
                        self._terminate(p)
                names = []
                for _ in range(max(0, missing)):
                    d.serial += 1
                    names.append(f"{d.name}-{d.serial}")
            for name in names:  # start processes outside the lock
                port, stop = self.kubelet(name)
                with self.lock:
                    pod = _Pod(name, d.namespace, d.name, dict(d.match_labels),
                               dict(d.requests), created=time.monotonic(), port=port, stop=stop)
                    pod.resource_version = self._bump()
                    self.pods[(d.namespace, name)] = pod

    def _terminate(self, pod: _Pod) -> None:
        if not pod.terminating:
            pod.terminating_since = time.monotonic()
        pod.terminating = True
        pod.ready = False
        pod.resource_version = self._bump()

    def _probe(self) -> None:
        with self.lock:
            pods = [p for p in self.pods.values() if not p.terminating]
        for p in pods:
            try:
                ok = self._http.get(f"http://127.0.0.1:{p.port}/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            with self.lock:
                if ok != p.ready and not p.terminating:
                    p.ready = ok
                    p.ever_ready = p.ever_ready or ok
                    p.resource_version = self._bump()

    def _reap(self) -> None:
        with self.lock:
            gone = [p for p in self.pods.values() if p.terminating
                    and time.monotonic() - p.terminating_since >= self.termination_s]
        for p in gone:
            if p.stop is not None:
                p.stop()  # SIGTERM, then the kubelet's grace period
            with self.lock:
                self.pods.pop((p.namespace, p.name), None)
                self.deleted_pods.append(p.name)

    def _publish_slices(self) -> None:
        """One EndpointSlice per (service, port), as the controller groups by port set."""
        want: dict[tuple[str, str], dict[str, Any]] = {}
        for d in self.deployments.values():
            for p in self.pods.values():
                if p.deployment != d.name or p.namespace != d.namespace:
                    continue
                name = f"{d.service}-{p.port}"
                s = want.setdefault((d.namespace, name), {
                    "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                    "metadata": {"name": name, "namespace": d.namespace, "labels": {
                        "kubernetes.io/service-name": d.service,
                        "endpointslice.kubernetes.io/managed-by":
                            "endpointslice-controller.k8s.io"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": p.port, "protocol": "TCP"}],
                    "endpoints": []})
                s["endpoints"].append({
                    "addresses": ["127.0.0.1"],
                    "conditions": {"ready": p.ready and not p.terminating,
                                   "serving": p.ready, "terminating": p.terminating},
                    "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace,
                                  "uid": p.uid}})
        for key, s in want.items():
            old = self.slices.get(key)
            body = {k: v for k, v in s.items() if k != "metadata"}
            if old is not None and {k: v for k, v in old.items() if k != "metadata"} == body:
                continue
            rv = self._bump()
            s["metadata"].update(resourceVersion=str(rv),
                                 uid=(old or {}).get("metadata", {}).get("uid",
                                                                          str(uuid.uuid4())))
            self.slices[key] = s
            self.events.append((rv, "MODIFIED" if old else "ADDED", json.loads(json.dumps(s))))
        for key in [k for k in self.slices if k not in want]:
            s = self.slices.pop(key)
            rv = self._bump()
            s["metadata"]["resourceVersion"] = str(rv)
            self.events.append((rv, "DELETED", s))
        self.changed.notify_all()

    # -- HTTP -------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and chunked watch streams

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                api._serve(self, "GET")

            def do_PUT(self) -> None:  # noqa: N802
                api._serve(self, "PUT")

            def do_PATCH(self) -> None:  # noqa: N802
                api._serve(self, "PATCH")

            def do_DELETE(self) -> None:  # noqa: N802
                api._serve(self, "DELETE")

        return Handler

    def _fault(self, method: str, path: str, watch: bool) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if (f.method == method and re.search(f.path, path)
                        and (f.watch is None or f.watch == watch)):
                    f.times -= 1
                    if f.times <= 0:
                        self.faults.remove(f)
                    return f
        return None

    def _serve(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        watch = query.get("watch") in ("true", "1")
        with self.lock:
            self.requests.append((method, h.path))
        fault = self._fault(method, url.path, watch)
        if fault is not None:
            time.sleep(fault.delay_s)
            if fault.status >= 400:
                reason = {409: "Conflict", 500: "InternalError",
                          503: "ServiceUnavailable"}.get(fault.status, "Unknown")
                return self._send(h, fault.status, _status(fault.status, reason,
                                                           f"injected {fault.status}"))
        try:
            status, payload = self._route(method, url.path, query, body, h, watch)
        except KeyError as e:
            status, payload = 404, _status(404, "NotFound", f"{e.args[0]} not found")
        if status:
            self._send(h, status, payload)

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(self, method: str, path: str, query: dict[str, str], body: Any,
               h: BaseHTTPRequestHandler, watch: bool) -> tuple[int, dict[str, Any]]:
        if m := re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/deployments(?:/([^/]+))?"
                             r"(/scale)?", path):
            ns, name, scale = m.groups()
            if name is None:
                with self.lock:
                    items = [self._deployment_json(d) for d in self.deployments.values()
                             if d.namespace == ns]
                    return 200, {"kind": "DeploymentList", "apiVersion": "apps/v1",
                                 "metadata": {"resourceVersion": str(self.rv)}, "items": items}
            with self.lock:
                d = self.deployments.get((ns, name))
                if d is None:
                    raise KeyError(f'deployments.apps "{name}"')
                if not scale:
                    return 200, self._deployment_json(d)
                if method == "GET":
                    return 200, self._scale_json(d)
                if method == "PUT":
                    rv = (body.get("metadata") or {}).get("resourceVersion")
                    if rv and rv != str(d.resource_version):
                        return 409, _status(409, "Conflict", f'Operation cannot be fulfilled '
                                            f'on deployments.apps "{name}": the object has been '
                                            "modified; please apply your changes to the latest "
                                            "version and try again")
                    replicas = int(body["spec"]["replicas"])
                elif method == "PATCH":
                    replicas = int(body["spec"]["replicas"])
                else:
                    return 405, _status(405, "MethodNotAllowed", method)
                if replicas < 0:
                    return 422, _status(422, "Invalid", "spec.replicas must be >= 0")
                d.replicas = replicas
                d.resource_version = self._bump()
                self.scale_writes.append(replicas)
                self.changed.notify_all()
                return 200, self._scale_json(d)
        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?", path):
            ns, name = m.groups()
            with self.lock:
                if name is None:
                    sel = query.get("labelSelector", "")
                    items = [self._pod_json(p) for p in self.pods.values()
                             if p.namespace == ns and _match(sel, p.labels)]
                    return 200, {"kind": "PodList", "apiVersion": "v1",
                                 "metadata": {"resourceVersion": str(self.rv)}, "items": items}
                p = self.pods.get((ns, name))
                if p is None:
                    raise KeyError(f'pods "{name}"')
                if method == "PATCH":
                    ann = ((body or {}).get("metadata") or {}).get("annotations") or {}
                    for k, v in ann.items():
                        if v is None:
                            p.annotations.pop(k, None)
                        else:
                            p.annotations[k] = str(v)
                    p.resource_version = self._bump()
                elif method == "DELETE":
                    self._terminate(p)
                    self.changed.notify_all()
                return 200, self._pod_json(p)
        if m := re.fullmatch(r"/apis/discovery\.k8s\.io/v1/namespaces/([^/]+)/endpointslices",
                             path):
            ns = m.group(1)
            sel = query.get("labelSelector", "")
            if watch:
                self._watch(h, ns, sel, int(query.get("resourceVersion") or 0),
                            float(query.get("timeoutSeconds") or 60))
                return 0, {}
            with self.lock:
                items = [s for (sns, _), s in self.slices.items()
                         if sns == ns and _match(sel, s["metadata"]["labels"])]
                return 200, {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                             "metadata": {"resourceVersion": str(self.rv)}, "items": items}
        return 404, _status(404, "NotFound", f"the server could not find {path}")

    def _watch(self, h: BaseHTTPRequestHandler, ns: str, selector: str, since: int,
               timeout_s: float) -> None:
        """Stream events after ``since`` until the timeout, the server's stop or 410."""
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")  # as the real server streams watches
        h.end_headers()

        def chunk(event: dict[str, Any]) -> None:
            data = (json.dumps(event) + "\n").encode()
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        deadline = time.monotonic() + timeout_s
        try:
            while not self._stopping.is_set() and time.monotonic() < deadline:
                with self.changed:
                    if since < self.compacted_rv:
                        gone = _status(410, "Expired", f"too old resource version: {since} "
                                       f"({self.compacted_rv})")
                        pending = [{"type": "ERROR", "object": gone}]
                        since = 1 << 62
                    else:
                        pending = [{"type": t, "object": o} for rv, t, o in self.events
                                   if rv > since and o["metadata"]["namespace"] == ns
                                   and _match(selector, o["metadata"]["labels"])]
                        since = max([since, *(rv for rv, _, _ in self.events)])
                    if not pending:
                        self.changed.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                for event in pending:
                    chunk(event)
                if since == 1 << 62:
                    break
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        h.close_connection = True

    # -- JSON shapes ------------------------------------------------------------------------

    def _deployment_json(self, d: _Deployment) -> dict[str, Any]:
        ready = sum(1 for p in self.pods.values() if p.deployment == d.name and p.ready)
        return {"kind": "Deployment", "apiVersion": "apps/v1",
                "metadata": {"name": d.name, "namespace": d.namespace, "uid": d.uid,
                             "resourceVersion": str(d.resource_version)},
                "spec": {"replicas": d.replicas,
                         "selector": {"matchLabels": d.match_labels},
                         "template": {"metadata": {"labels": d.match_labels}, "spec": {
                             "containers": [{"name": "engine", "image": "strata",
                                             "resources": {"requests": d.requests}}]}}},
                "status": {"replicas": len([p for p in self.pods.values()
                                            if p.deployment == d.name]),
                           "readyReplicas": ready}}

    def _scale_json(self, d: _Deployment) -> dict[str, Any]:
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": d.name, "namespace": d.namespace, "uid": d.uid,
                             "resourceVersion": str(d.resource_version)},
                "spec": {"replicas": d.replicas},
                "status": {"replicas": len([p for p in self.pods.values()
                                            if p.deployment == d.name]),
                           "selector": ",".join(f"{k}={v}" for k, v in d.match_labels.items())}}

    def _pod_json(self, p: _Pod) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": p.name, "namespace": p.namespace, "uid": p.uid,
                                "labels": p.labels, "annotations": dict(p.annotations),
                                "resourceVersion": str(p.resource_version),
                                "creationTimestamp": time.strftime(
                                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if p.terminating:
            meta["deletionTimestamp"] = meta["creationTimestamp"]
        return {"kind": "Pod", "apiVersion": "v1", "metadata": meta,
                "spec": {"containers": [{"name": "engine", "image": "strata",
                                         "ports": [{"name": "http", "containerPort": p.port}],
                                         "resources": {"requests": p.requests}}]},
                "status": {"phase": "Running", "podIP": "127.0.0.1",
                           "conditions": [{"type": "Ready",
                                           "status": "True" if p.ready else "False"}]}}
