"""The cluster file as Kubernetes objects: ``strata deploy render -f cluster.yaml``.

A pure function from a validated ``ClusterConfig`` to plain dicts, so the manifests can be
checked (schema, names, flags) without an API server. The objects are the ones
``strata.platform.kubernetes`` expects to find: one Deployment and one Service (port
``http``) per tier, named by ``platform.deployment_name``/``service_name``, and a gateway
that follows the routed tier's EndpointSlices. Command lines are the ones the local
platform starts (``engine_spec``, ``cluster_stage_specs``), so a flag added there reaches
the cluster too.

* **Engine tiers**: Deployment, Service, PodDisruptionBudget; probes on ``/health``; a
  preStop ``POST /drain`` (the engine then drains for ``drain_timeout_s`` on SIGTERM).
* **Stage pipelines** (``strata.deploy.stages``): the head and one Deployment per later
  stage (explicit layer ranges: ``stages: auto`` measures at start-up and is refused);
  stage replicas join the head themselves, and their frame links accept only the
  pipeline's own pods.
* **Autoscaling**, by ``RenderOptions.autoscaler``: ``strata`` renders the strata
  controller (the autoscaler in-cluster, scaling engine tiers or a pipeline's stages
  through the Deployment scale subresource with a Role limited to exactly those objects,
  and draining a pod before it goes); ``hpa`` and ``keda``
  render HorizontalPodAutoscalers (plus prometheus-adapter rules) or KEDA ScaledObjects
  on the same signals instead, and no controller (``strata.deploy.autoscaling``).
* **Monitoring** (``strata.deploy.monitoring``; off with ``monitoring=False``): a
  ServiceMonitor for every ``/metrics`` (engines, stages, gateway, the controller's
  metrics port; none is gated by the internal token, and the NetworkPolicies let the
  monitoring namespace in) and the Grafana dashboard (``strata.deploy.dashboard``) as a
  ConfigMap for Grafana's sidecar, next to Grafana in the monitoring namespace.
* **The internal token**: every pod reads the Secret ``strata-internal-token`` (key
  ``token``). It is not rendered by default, since a fresh random value on every render
  would change the manifests on every run (GitOps diffs); ``with_secret`` renders one.

Not rendered: API keys for the gateway (``gateway.api_keys_file`` is refused: give the
gateway ``STRATA_API_KEYS`` from a Secret of your own).
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

import yaml

from strata.config import ClusterConfig, parse_cluster_config
from strata.deploy.objects import (
    CONFIG_FILE,
    CONFIG_MAP,
    CONFIG_MOUNT,
    CONTROLLER,
    CONTROLLER_METRICS_PORT,
    ENGINE_PORT,
    GATEWAY,
    GATEWAY_ACCOUNT,
    INTERNAL_TOKEN_KEY,
    INTERNAL_TOKEN_SECRET,
    PART_OF,
    POD_HOST,
    SERVICE_ACCOUNT,
    RenderError,
    RenderOptions,
    component_peer,
    container_security,
    grace_s,
    http_probes,
    labels,
    meta,
    monitoring_peer,
    network_policy,
    pdb,
    replica_deployment,
    service,
    strip_threads,
    token_env,
)

__all__ = ["ENGINE_PORT", "RenderError", "RenderOptions", "render", "to_yaml", "file_name"]

_RESERVED_TIERS = ("gateway", "controller")


def kubernetes_cluster_file(data: dict[str, Any] | None, namespace: str) -> dict[str, Any]:
    """The cluster file as the controller reads it in-cluster: kubernetes platform, namespace.

    The user's file is usually the local one (``platform.kind: local``); everything else in
    it (tiers, autoscaling, SLOs, routing) carries over unchanged.
    """
    out = dict(data or {})
    platform = dict(out.get("platform") or {})
    for key in ("log_dir", "kubeconfig", "kube_context", "api_server"):
        platform.pop(key, None)  # paths and credentials of the machine that rendered it
    platform.update(kind="kubernetes", namespace=namespace, kube_auth="in-cluster")
    out["platform"] = platform
    return out


def engine_argv(config: ClusterConfig, tier: str) -> list[str]:
    """``strata engine ...`` for ``tier``: the local platform's command, bound on 0.0.0.0."""
    from strata.platform.process import engine_spec

    argv = engine_spec(config, tier, cores=1).argv(POD_HOST, ENGINE_PORT)
    return strip_threads(argv, config.engine_for(tier).threads)


def gateway_argv(config: ClusterConfig, namespace: str) -> list[str]:
    """``strata gateway`` fed by the tier Services' EndpointSlices, with the file's options.

    Several tiers: one ``--tier-model tier=model`` each, routed by the request's model.
    """
    g = config.gateway
    argv = ["strata", "gateway", "--host", POD_HOST, "--port", str(g.port),
            "--endpoints-from", "kubernetes", "--kube-namespace", namespace,
            "--kube-service", config.platform.service_name]
    if len(config.tiers) == 1:
        tier = config.default_tier
        argv += ["--tier", tier, "--served-model-name", config.served_model(tier)]
    else:
        for tier in config.tiers:
            argv += ["--tier-model", f"{tier}={config.served_model(tier)}"]
    argv += ["--policy", config.routing.policy]
    for key, value in sorted(config.routing.params.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RenderError(f"routing.params.{key}: only numbers and strings can be passed "
                              f"to the gateway's --policy-param, got {value!r}")
        argv += ["--policy-param", f"{key}={value}"]
    argv += ["--poll-interval-s", str(g.poll_interval_s),
             "--health-interval-s", str(g.health_interval_s),
             "--connect-timeout-s", str(g.connect_timeout_s),
             "--read-timeout-s", str(g.read_timeout_s),
             "--drain-timeout-s", str(config.platform.drain_timeout_s),
             "--max-retries", str(g.max_retries),
             "--eject-after-failures", str(g.eject_after_failures),
             "--rate-limit-rpm", str(g.rate_limit_rpm), "--rate-limit-tpm", str(g.rate_limit_tpm),
             "--max-body-bytes", str(g.max_body_bytes),
             "--max-queued-per-model", str(g.max_queued_per_model),
             "--queue-timeout-s", str(g.queue_timeout_s),
             "--hold-timeout-s", str(g.hold_timeout_s),
             "--log-level", "warning"]
    if g.request_timeout_s is not None:
        argv += ["--request-timeout-s", str(g.request_timeout_s)]
    if g.max_in_flight_per_model is not None:
        argv += ["--max-in-flight-per-model", str(g.max_in_flight_per_model)]
    return argv


def _prestop_drain(port: int) -> dict[str, Any]:
    """``POST /drain`` before SIGTERM (the image has python but no curl)."""
    code = ("import os,urllib.request as u;"
            f"u.urlopen(u.Request('http://127.0.0.1:{port}/drain',method='POST',"
            "headers={'x-strata-internal-token':os.environ['STRATA_INTERNAL_TOKEN']}),"
            "timeout=5)")
    return {"exec": {"command": ["python", "-c", code]}}


def _engine_objects(config: ClusterConfig, tier: str, opts: RenderOptions,
                    replicas: int | None) -> list[dict[str, Any]]:
    p = config.platform
    name = p.deployment_name.format(tier=tier)
    pod_labels = labels("engine", tier)
    threads = config.engine_for(tier).threads
    container = {
        "name": "engine", "image": opts.image, "imagePullPolicy": "IfNotPresent",
        "command": engine_argv(config, tier),
        "ports": [{"name": p.port_name, "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "env": [token_env()],
        "resources": {"requests": {"cpu": str(threads or 1)}},
        **http_probes(config, p.port_name),
        "lifecycle": {"preStop": _prestop_drain(ENGINE_PORT)},
        "securityContext": container_security(),
    }
    ns = opts.namespace
    return [replica_deployment(name, ns, pod_labels, container, replicas=replicas,
                               grace=grace_s(config)),
            service(p.service_name.format(tier=tier), ns, pod_labels,
                    [(p.port_name, ENGINE_PORT)]),
            pdb(name, ns, pod_labels)]


def _account(name: str, namespace: str, component: str,
             rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A ServiceAccount with its own Role (``rules``) bound to it, in ``namespace`` only."""
    obj_labels = labels(component)
    rbac = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(name, namespace, obj_labels)},
        {"apiVersion": rbac, "kind": "Role", "metadata": meta(name, namespace, obj_labels),
         "rules": rules},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": meta(name, namespace, obj_labels),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
    ]


_READ_SLICES = {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                "verbs": ["get", "list", "watch"]}


def _controller_rbac(config: ClusterConfig, namespace: str,
                     tiers: list[str]) -> list[dict[str, Any]]:
    """Least privilege: the tiers' own Deployments; pods and EndpointSlices of the namespace."""
    deployments = sorted(config.platform.deployment_name.format(tier=t) for t in tiers)
    return _account(SERVICE_ACCOUNT, namespace, "controller", [
        {"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale"],
         "resourceNames": deployments, "verbs": ["get", "update", "patch"]},
        dict(_READ_SLICES),
        # patch: the pod-deletion-cost annotation; delete: drain(replica) replaces a pod.
        {"apiGroups": [""], "resources": ["pods"],
         "verbs": ["get", "list", "watch", "patch", "delete"]},
    ])


def _gateway_objects(config: ClusterConfig, namespace: str, image: str) -> list[dict[str, Any]]:
    port = config.gateway.port
    gw_labels = labels("gateway")
    tcp = {"tcpSocket": {"port": "http"}}
    container = {
        "name": "gateway", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": gateway_argv(config, namespace),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        # The replicas' prefix reports (/internal/prefix) want the internal token.
        "env": [token_env()],
        # The gateway's /health is 503 with no ready replica; it must stay reachable to
        # hold requests meanwhile, so its probes check the listener only.
        "readinessProbe": {**tcp, "periodSeconds": 5},
        "livenessProbe": {**tcp, "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": container_security(),
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta(GATEWAY, namespace, gw_labels),
        "spec": {"replicas": config.gateway.replicas, "selector": {"matchLabels": gw_labels},
                 "template": {"metadata": {"labels": gw_labels}, "spec": {
                     "serviceAccountName": GATEWAY_ACCOUNT,
                     "terminationGracePeriodSeconds": grace_s(config),
                     # Active-active gateways on different nodes where the cluster has them.
                     "affinity": {"podAntiAffinity": {
                         "preferredDuringSchedulingIgnoredDuringExecution": [{
                             "weight": 100, "podAffinityTerm": {
                                 "topologyKey": "kubernetes.io/hostname",
                                 "labelSelector": {"matchLabels": gw_labels}}}]}},
                     "containers": [container]}}},
    }
    objects = [deployment, service(GATEWAY, namespace, gw_labels, [("http", port)])]
    if config.gateway.replicas > 1:
        objects.append(pdb(GATEWAY, namespace, gw_labels))
    return objects


def _controller_objects(config: ClusterConfig, namespace: str,
                        image: str) -> list[dict[str, Any]]:
    ctl_labels = labels("controller")
    volume = {"name": "cluster", "configMap": {"name": CONFIG_MAP}}
    mount = {"name": "cluster", "mountPath": CONFIG_MOUNT, "readOnly": True}
    argv = ["strata", "controller", "-f", f"{CONFIG_MOUNT}/{CONFIG_FILE}",
            "--gateway-url", f"http://{GATEWAY}.{namespace}.svc:{config.gateway.port}",
            # desired/current replicas, scale events: the dashboard's scaling panels
            "--metrics-port", str(CONTROLLER_METRICS_PORT)]
    container = {"name": "controller", "image": image, "imagePullPolicy": "IfNotPresent",
                 "command": argv,
                 "ports": [{"name": "metrics", "containerPort": CONTROLLER_METRICS_PORT,
                            "protocol": "TCP"}],
                 "env": [token_env()], "volumeMounts": [mount],
                 "securityContext": container_security()}
    metrics = service(CONTROLLER, namespace, ctl_labels, [("metrics", CONTROLLER_METRICS_PORT)])
    return [metrics, {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta(CONTROLLER, namespace, ctl_labels),
        # One autoscaler at a time: Recreate never runs two side by side.
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                 "selector": {"matchLabels": ctl_labels},
                 "template": {"metadata": {"labels": ctl_labels}, "spec": {
                     "serviceAccountName": SERVICE_ACCOUNT, "containers": [container],
                     "volumes": [volume]}}},
    }]


def _gateway_policy(config: ClusterConfig, namespace: str) -> dict[str, Any]:
    gateway = network_policy(GATEWAY, namespace, "gateway", labels("gateway"), [])
    # No `from`: the gateway is the one component reachable from anywhere.
    gateway["spec"]["ingress"] = [{"ports": [{"port": config.gateway.port, "protocol": "TCP"}]}]
    return gateway


def _engine_policy(namespace: str, opts: RenderOptions, controller: bool) -> dict[str, Any]:
    peers = [component_peer("gateway")]
    if controller:
        peers.append(component_peer("controller"))
    selector = {"app.kubernetes.io/name": "strata", "app.kubernetes.io/component": "engine"}
    return network_policy("strata-engines", namespace, "engine", selector,
                          [([*peers, *monitoring_peer(opts)], [ENGINE_PORT])])


def _controller_policy(namespace: str, opts: RenderOptions) -> dict[str, Any]:
    """The controller serves only its /metrics: Prometheus alone may reach it."""
    rules = [(monitoring_peer(opts), [CONTROLLER_METRICS_PORT])] if opts.monitoring else []
    return network_policy(CONTROLLER, namespace, "controller", labels("controller"), rules)


def _secret(namespace: str) -> dict[str, Any]:
    """The internal token with a fresh random value (``--with-secret``)."""
    token = secrets.token_urlsafe(32)
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": meta(INTERNAL_TOKEN_SECRET, namespace, labels("internal-token")),
            "data": {INTERNAL_TOKEN_KEY: base64.b64encode(token.encode()).decode()}}


def _check(config: ClusterConfig, opts: RenderOptions) -> None:
    for name in config.tiers:
        if name in _RESERVED_TIERS:
            raise RenderError(f"tiers.{name}: the name is taken by strata's own {name}; "
                              "rename the tier (e.g. engine)")
    if config.gateway.api_keys_file is not None:
        raise RenderError("gateway.api_keys_file is a path on this machine; remove it and "
                          "give the gateway STRATA_API_KEYS from a Secret instead")
    if opts.autoscaler not in ("strata", "hpa", "keda"):
        raise RenderError(f"autoscaler {opts.autoscaler!r}: use strata, hpa or keda")


def render(data: dict[str, Any] | None, *, namespace: str = "strata",
           image: str = "strata:latest", **options: Any) -> list[dict[str, Any]]:
    """Every object of the cluster, in apply order, from the parsed cluster file ``data``.

    ``options`` are the other ``RenderOptions`` fields (autoscaler, with_secret, ...).
    Raises ``ClusterConfigError`` for an invalid file and ``RenderError`` for a valid one
    that cannot run on Kubernetes (the message says what to change).
    """
    from strata.deploy.autoscaling import autoscaling_objects, scaled_tiers
    from strata.deploy.monitoring import monitoring_objects
    from strata.deploy.stages import stage_objects, stage_policies, stage_tier_plans

    opts = RenderOptions(namespace=namespace, image=image, **options)
    cluster_data = kubernetes_cluster_file(data, namespace)
    config = parse_cluster_config(cluster_data, "cluster file")
    _check(config, opts)
    pipeline = config.pipeline_tier is not None
    plans = stage_tier_plans(config) if pipeline else []
    engines = [n for n, t in config.tiers.items() if t.kind == "engine"]
    scaled = scaled_tiers(config, plans, opts)  # RenderError if the choice cannot scale them
    # With hpa or keda the native objects scale instead: no controller is rendered at all.
    controller = opts.autoscaler == "strata"
    tiers = engines + [p.name for p in plans]  # what the controller drives
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": namespace, "labels": {"app.kubernetes.io/part-of": PART_OF}}},
    ]
    if opts.with_secret:
        objects.append(_secret(namespace))
    if controller:
        objects += _controller_rbac(config, namespace, tiers)
    objects += _account(GATEWAY_ACCOUNT, namespace, "gateway", [dict(_READ_SLICES)])
    objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": meta(CONFIG_MAP, namespace, labels("controller")),
                    "data": {CONFIG_FILE: yaml.safe_dump(cluster_data, sort_keys=False)}})
    managed = {s.deployment for s in scaled}  # spec.replicas left to the HPA / KEDA
    for tier in engines:
        name = config.platform.deployment_name.format(tier=tier)
        objects += _engine_objects(config, tier, opts,
                                   None if name in managed else config.tiers[tier].initial_replicas)
    if pipeline:
        objects += stage_objects(config, plans, opts, managed)
    objects += _gateway_objects(config, namespace, image)
    if controller:
        objects += _controller_objects(config, namespace, image)
    objects += autoscaling_objects(config, scaled, opts)
    objects += monitoring_objects(config, opts)
    objects.append(_gateway_policy(config, namespace))
    if engines:
        objects.append(_engine_policy(namespace, opts, controller))
    if pipeline:
        objects += stage_policies(config, plans, opts, controller)
    if controller:
        objects.append(_controller_policy(namespace, opts))
    return objects


def file_name(obj: dict[str, Any], index: int) -> str:
    """``03-role-strata-controller.yaml``: apply order first, then kind and name."""
    return f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded cluster file) as readable ``|`` blocks, no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        """Repeated label dicts are written out in full: manifests are read by people."""
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """One multi-document YAML stream."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)
