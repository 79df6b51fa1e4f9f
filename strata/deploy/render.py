"""The cluster file as Kubernetes objects: ``strata deploy render -f cluster.yaml``.

A pure function from a validated ``ClusterConfig`` to plain dicts, so the manifests can be
checked (schema, names, flags) without an API server. The objects are the ones
``strata.platform.kubernetes`` expects to find: one Deployment and one Service (port
``http``) per engine tier, named by ``platform.deployment_name``/``service_name``; a gateway
that follows the tier's EndpointSlices; and the ``strata controller`` that scales the tier
through the Deployment's scale subresource with a Role limited to exactly those objects.

The engine command line is the one the local platform starts (``engine_spec``), so a flag
added there reaches the cluster too. Not rendered: the ``strata-internal-token`` Secret (it
holds a random value the user creates once), autoscaler objects (HPA/KEDA) and monitoring.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from strata.config import ClusterConfig, parse_cluster_config

# The Secret's name and key, not its value (which the user creates; see the module doc).
INTERNAL_TOKEN_SECRET = "strata-internal-token"  # nosec B105 (a name, not a secret)
INTERNAL_TOKEN_KEY = "token"  # nosec B105 (a key name, not a secret)
# A pod serves on its own IP (the Service and NetworkPolicies below decide who reaches it).
POD_HOST = "0.0.0.0"  # nosec B104 (inside a pod, behind the NetworkPolicy)
CONFIG_MAP = "strata-cluster"
CONFIG_MOUNT = "/etc/strata"
CONFIG_FILE = "cluster.yaml"
SERVICE_ACCOUNT = "strata-controller"
GATEWAY_ACCOUNT = "strata-gateway"
GATEWAY = "strata-gateway"
CONTROLLER = "strata-controller"
ENGINE_PORT = 8000
PART_OF = "strata"
_RESERVED_TIERS = ("gateway", "controller")
_PROBE_PERIOD_S = 5


class RenderError(ValueError):
    """The cluster file cannot be rendered for Kubernetes; the message says why and how."""


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


def _labels(component: str, tier: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "strata", "app.kubernetes.io/part-of": PART_OF,
              "app.kubernetes.io/component": component}
    if tier is not None:
        labels["strata/tier"] = tier
    return labels


def _meta(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": dict(labels)}


def _token_env() -> dict[str, Any]:
    return {"name": "STRATA_INTERNAL_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": INTERNAL_TOKEN_SECRET, "key": INTERNAL_TOKEN_KEY}}}


def _security() -> dict[str, Any]:
    # The image runs as uid 10001 (deploy/Dockerfile) and writes only to mounted volumes.
    return {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}


def engine_argv(config: ClusterConfig, tier: str) -> list[str]:
    """``strata engine ...`` for ``tier``: the local platform's command, bound on 0.0.0.0.

    Threads the file leaves unset are left to the engine (it measures the pod's cores)
    rather than divided among replicas as on one machine.
    """
    from strata.platform.process import engine_spec

    argv = engine_spec(config, tier, cores=1).argv(POD_HOST, ENGINE_PORT)
    i = argv.index("engine")
    out = ["strata", *argv[i:]]
    if config.engine_for(tier).threads is None:
        j = out.index("--threads")
        del out[j:j + 2]
    return out


def gateway_argv(config: ClusterConfig, namespace: str) -> list[str]:
    """``strata gateway`` fed by the tier Service's EndpointSlices, with the file's options."""
    from strata.cluster import served_model_name

    g = config.gateway
    tier = config.tier_name
    argv = ["strata", "gateway", "--host", POD_HOST, "--port", str(g.port),
            "--endpoints-from", "kubernetes", "--kube-namespace", namespace,
            "--kube-service", config.platform.service_name, "--tier", tier,
            "--served-model-name", served_model_name(config),
            "--policy", config.routing.policy]
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


def _grace_s(config: ClusterConfig) -> int:
    """Drain, then the stop margin: the kubelet's SIGKILL must not cut a drain short."""
    p = config.platform
    return math.ceil(p.drain_timeout_s + p.stop_timeout_s)


def _prestop_drain(port: int) -> dict[str, Any]:
    """``POST /drain`` before SIGTERM (the image has python but no curl)."""
    code = ("import os,urllib.request as u;"
            f"u.urlopen(u.Request('http://127.0.0.1:{port}/drain',method='POST',"
            "headers={'x-strata-internal-token':os.environ['STRATA_INTERNAL_TOKEN']}),"
            "timeout=5)")
    return {"exec": {"command": ["python", "-c", code]}}


def _engine_objects(config: ClusterConfig, tier: str, namespace: str,
                    image: str) -> list[dict[str, Any]]:
    p = config.platform
    t = config.tiers[tier]
    name = p.deployment_name.format(tier=tier)
    service = p.service_name.format(tier=tier)
    labels = _labels("engine", tier)
    health = {"path": "/health", "port": p.port_name}
    grace = _grace_s(config)
    threads = config.engine_for(tier).threads
    container = {
        "name": "engine", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": engine_argv(config, tier),
        "ports": [{"name": p.port_name, "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "env": [_token_env()],
        "resources": {"requests": {"cpu": str(threads or 1)}},
        # Loading the model may take start_timeout_s; until then neither probe below runs.
        "startupProbe": {"httpGet": health, "periodSeconds": _PROBE_PERIOD_S,
                         "timeoutSeconds": 3, "failureThreshold": max(1, math.ceil(p.start_timeout_s
                                                              / _PROBE_PERIOD_S))},
        # /health answers 503 while draining, so the Service drops the pod at once.
        # Two misses, not one: a busy engine may answer a probe late.
        "readinessProbe": {"httpGet": health, "periodSeconds": 2, "timeoutSeconds": 3,
                           "failureThreshold": 2},
        # Also 503 while draining: the threshold outlasts the grace period, so liveness only
        # restarts an engine that died, never one finishing its drain.
        "livenessProbe": {"httpGet": health, "periodSeconds": 10, "timeoutSeconds": 5,
                          "failureThreshold": math.ceil(grace / 10) + 1},
        "lifecycle": {"preStop": _prestop_drain(ENGINE_PORT)},
        "securityContext": _security(),
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, namespace, labels),
        "spec": {
            "replicas": t.initial_replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels}, "spec": {
                "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": grace,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                    "runAsGroup": 10001, "fsGroup": 10001},
                "containers": [container],
            }},
        },
    }
    svc = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(service, namespace, labels),
        "spec": {"selector": labels, "ports": [{"name": p.port_name, "port": ENGINE_PORT,
                                                "targetPort": p.port_name, "protocol": "TCP"}]},
    }
    pdb = {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _meta(name, namespace, labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    }
    return [deployment, svc, pdb]


def _rbac(config: ClusterConfig, namespace: str) -> list[dict[str, Any]]:
    """Least privilege: the tiers' own Deployments; pods and EndpointSlices of the namespace."""
    p = config.platform
    deployments = sorted(p.deployment_name.format(tier=t) for t in config.tiers)
    labels = _labels("controller")
    sa = {"apiVersion": "v1", "kind": "ServiceAccount",
          "metadata": _meta(SERVICE_ACCOUNT, namespace, labels)}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": _meta(SERVICE_ACCOUNT, namespace, labels),
        "rules": [
            {"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale"],
             "resourceNames": deployments, "verbs": ["get", "update", "patch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
             "verbs": ["get", "list", "watch"]},
            # patch: the pod-deletion-cost annotation; delete: drain(replica) replaces a pod.
            {"apiGroups": [""], "resources": ["pods"],
             "verbs": ["get", "list", "watch", "patch", "delete"]},
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _meta(SERVICE_ACCOUNT, namespace, labels),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": SERVICE_ACCOUNT},
        "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                      "namespace": namespace}],
    }
    gw_labels = _labels("gateway")
    gw_sa = {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": _meta(GATEWAY_ACCOUNT, namespace, gw_labels)}
    gw_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": _meta(GATEWAY_ACCOUNT, namespace, gw_labels),
        "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                   "verbs": ["get", "list", "watch"]}],
    }
    gw_binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _meta(GATEWAY_ACCOUNT, namespace, gw_labels),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": GATEWAY_ACCOUNT},
        "subjects": [{"kind": "ServiceAccount", "name": GATEWAY_ACCOUNT,
                      "namespace": namespace}],
    }
    return [sa, role, binding, gw_sa, gw_role, gw_binding]


def _config_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    volume = {"name": "cluster", "configMap": {"name": CONFIG_MAP}}
    mount = {"name": "cluster", "mountPath": CONFIG_MOUNT, "readOnly": True}
    return volume, mount


def _gateway_objects(config: ClusterConfig, namespace: str, image: str) -> list[dict[str, Any]]:
    port = config.gateway.port
    labels = _labels("gateway")
    tcp = {"tcpSocket": {"port": "http"}}
    container = {
        "name": "gateway", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": gateway_argv(config, namespace),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        # The gateway's /health is 503 with no ready replica; it must stay reachable to
        # hold requests meanwhile, so its probes check the listener only.
        "readinessProbe": {**tcp, "periodSeconds": 5},
        "livenessProbe": {**tcp, "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": _security(),
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(GATEWAY, namespace, labels),
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "serviceAccountName": GATEWAY_ACCOUNT,
                     "terminationGracePeriodSeconds": _grace_s(config),
                     "containers": [container]}}},
    }
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(GATEWAY, namespace, labels),
           "spec": {"selector": labels, "ports": [{"name": "http", "port": port,
                                                   "targetPort": "http", "protocol": "TCP"}]}}
    return [deployment, svc]


def _controller_objects(config: ClusterConfig, namespace: str,
                        image: str) -> list[dict[str, Any]]:
    labels = _labels("controller")
    volume, mount = _config_volume()
    argv = ["strata", "controller", "-f", f"{CONFIG_MOUNT}/{CONFIG_FILE}",
            "--gateway-url", f"http://{GATEWAY}.{namespace}.svc:{config.gateway.port}"]
    container = {"name": "controller", "image": image, "imagePullPolicy": "IfNotPresent",
                 "command": argv, "env": [_token_env()], "volumeMounts": [mount],
                 "securityContext": _security()}
    return [{
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(CONTROLLER, namespace, labels),
        # One autoscaler at a time: Recreate never runs two side by side.
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                 "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "serviceAccountName": SERVICE_ACCOUNT, "containers": [container],
                     "volumes": [volume]}}},
    }]


def _network_policies(config: ClusterConfig, namespace: str) -> list[dict[str, Any]]:
    gateway = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(GATEWAY, namespace, _labels("gateway")),
        "spec": {"podSelector": {"matchLabels": _labels("gateway")},
                 "policyTypes": ["Ingress"],
                 "ingress": [{"ports": [{"port": config.gateway.port, "protocol": "TCP"}]}]},
    }
    peers = [{"podSelector": {"matchLabels": _labels(c)}} for c in ("gateway", "controller")]
    engines = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta("strata-engines", namespace, _labels("engine")),
        "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "strata",
                                                 "app.kubernetes.io/component": "engine"}},
                 "policyTypes": ["Ingress"],
                 "ingress": [{"from": peers,
                              "ports": [{"port": ENGINE_PORT, "protocol": "TCP"}]}]},
    }
    return [gateway, engines]


def render(data: dict[str, Any] | None, *, namespace: str = "strata",
           image: str = "strata:latest") -> list[dict[str, Any]]:
    """Every object of the cluster, in apply order, from the parsed cluster file ``data``.

    Raises ``ClusterConfigError`` for an invalid file and ``RenderError`` for a valid one
    that cannot run on Kubernetes yet.
    """
    cluster_data = kubernetes_cluster_file(data, namespace)
    config = parse_cluster_config(cluster_data, "cluster file")
    for name, tier in config.tiers.items():
        if tier.kind == "stages":
            raise RenderError(f"tiers.{name}: stage tiers are not rendered yet; use an engine "
                              "tier (kind: engine) for Kubernetes")
        if name in _RESERVED_TIERS:
            raise RenderError(f"tiers.{name}: the name is taken by strata's own {name}; "
                              "rename the tier (e.g. engine)")
    if config.gateway.api_keys_file is not None:
        raise RenderError("gateway.api_keys_file is a path on this machine; remove it and "
                          "give the gateway STRATA_API_KEYS from a Secret instead")
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": namespace, "labels": {"app.kubernetes.io/part-of": PART_OF}}},
        *_rbac(config, namespace),
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": _meta(CONFIG_MAP, namespace, _labels("controller")),
         "data": {CONFIG_FILE: yaml.safe_dump(cluster_data, sort_keys=False)}},
    ]
    for tier in config.tiers:
        objects += _engine_objects(config, tier, namespace, image)
    objects += _gateway_objects(config, namespace, image)
    objects += _controller_objects(config, namespace, image)
    objects += _network_policies(config, namespace)
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
