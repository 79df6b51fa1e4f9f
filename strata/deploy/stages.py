"""A layer-range stage pipeline as Kubernetes objects: the head and one Deployment per stage.

The commands are the local platform's (``cluster_stage_specs``) with three changes a pod
needs. A stage replica binds ``$(POD_IP)`` (the downward API), since it tells the head
the address it serves on and a pod's 0.0.0.0 would mean nothing to the head. Its frame
listener takes a fixed port (``STAGE_DATA_PORT``), so the NetworkPolicy can name it. And
it ``--join``s the head itself, through a second head Service that also lists a head
that is not ready yet: the head reports ready only once every stage has a replica, so
the first replicas could never reach it through the routed Service. A replica joins
again after a head restart (``strata.stages.worker``); the strata cluster registers
replicas itself on one machine, and this is what a pod can do without it.

Scaling down a stage must not cut the sequences pinned to a replica (their KV is not
migrated): its preStop hook sends ``POST /drain`` (the head then pins nothing new there)
and waits until ``/load`` reports nothing running or queued, within ``drain_timeout_s``;
the grace period outlasts it. The head's hook does the same for its own requests.

Every pod takes ``STRATA_INTERNAL_TOKEN`` from the Secret: stage links authenticate
with it (an HMAC over the listener's nonce) and ``/drain``/``/stages/replicas`` want it.
"""

from __future__ import annotations

import math
from typing import Any

from strata.config import ClusterConfig
from strata.deploy.objects import (
    ENGINE_PORT,
    POD_HOST,
    POD_IP_ENV,
    PROBE_PERIOD_S,
    STAGE_DATA_PORT,
    RenderError,
    RenderOptions,
    component_peer,
    container_security,
    grace_s,
    http_probes,
    labels,
    monitoring_peer,
    network_policy,
    pdb,
    pod_ip_env,
    replica_deployment,
    service,
    strip_threads,
    token_env,
)
from strata.stages.tiers import StageTier, cluster_stage_specs

PIPELINE_LABEL = "strata/pipeline"


def stage_tier_plans(config: ClusterConfig) -> list[StageTier]:
    """The pipeline's tiers, head first; ``stages: auto`` cannot be rendered (it measures)."""
    from strata.platform.kubernetes import pipeline_tiers

    try:
        return pipeline_tiers(config)  # the tiers the strata controller will look up
    except ValueError as e:
        raise RenderError(str(e)) from None


def _pipeline(config: ClusterConfig) -> str:
    """The cluster's stage pipeline tier (the caller rendered one)."""
    tier = config.pipeline_tier
    assert tier is not None, "the cluster has no stage pipeline"
    return tier


def join_service_name(config: ClusterConfig) -> str:
    """The head Service that stage replicas join through (it lists a not-ready head too)."""
    return config.platform.service_name.format(tier=_pipeline(config)) + "-join"


def prestop_drain_wait(host_expr: str, port: int, timeout_s: float) -> dict[str, Any]:
    """``POST /drain``, then wait until ``/load`` shows nothing running or queued, twice.

    ``host_expr`` is a Python expression for the address the process listens on. Two
    idle reads apart, as the local platform does: nothing was in transit to it either.
    """
    code = "\n".join([
        "import json,os,time,urllib.request as u",
        f"h='http://%s:{port}'%{host_expr}",
        "u.urlopen(u.Request(h+'/drain',method='POST',headers="
        "{'x-strata-internal-token':os.environ['STRATA_INTERNAL_TOKEN']}),timeout=5)",
        f"d=time.monotonic()+{timeout_s:g};n=0",
        "while n<2 and time.monotonic()<d:",
        " b=json.load(u.urlopen(h+'/load',timeout=5))",
        " n=n+1 if b['running']==0 and b['waiting']==0 else 0",
        " time.sleep(0.25)",
    ])
    return {"exec": {"command": ["python", "-c", code]}}


def _container(config: ClusterConfig, opts: RenderOptions, name: str, argv: list[str],
               ports: list[tuple[str, int]], env: list[dict[str, Any]],
               host_expr: str) -> dict[str, Any]:
    threads = config.engine_for(_pipeline(config)).threads
    return {
        "name": name, "image": opts.image, "imagePullPolicy": "IfNotPresent",
        "command": strip_threads(argv, threads),
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
        "env": env,
        "resources": {"requests": {"cpu": str(threads or 1)}},
        "lifecycle": {"preStop": prestop_drain_wait(host_expr, ENGINE_PORT,
                                                    config.platform.drain_timeout_s)},
        "securityContext": container_security(),
    }


def _head_probes(config: ClusterConfig, port_name: str) -> dict[str, Any]:
    """The head's /health is 503 until every stage has a replica: only readiness uses it.

    Start-up and liveness watch the listener (it opens once the head's layers are loaded),
    so a head waiting for its stages is neither restarted nor routed to.
    """
    tcp = {"tcpSocket": {"port": port_name}}
    probes = http_probes(config, port_name)
    probes["startupProbe"] = {**tcp, "periodSeconds": PROBE_PERIOD_S,
                              "failureThreshold": probes["startupProbe"]["failureThreshold"]}
    probes["livenessProbe"] = {**tcp, "periodSeconds": 10,
                               "failureThreshold": math.ceil(grace_s(config) / 10) + 1}
    return probes


def stage_objects(config: ClusterConfig, plans: list[StageTier], opts: RenderOptions,
                  managed: set[str]) -> list[dict[str, Any]]:
    """Deployment, Service and PodDisruptionBudget of the head and of every later stage.

    ``managed``: Deployments an HPA or KEDA scales (their ``spec.replicas`` is left out).
    """
    p = config.platform
    tier = _pipeline(config)
    ns = opts.namespace
    t = config.tiers[tier]
    assert isinstance(t.stages, list)
    specs = cluster_stage_specs(config, tier, t.stages, cores=1)
    pipeline = {PIPELINE_LABEL: tier}
    join = f"http://{join_service_name(config)}.{ns}.svc:{ENGINE_PORT}"
    out: list[dict[str, Any]] = []
    for plan in plans:
        name = p.deployment_name.format(tier=plan.name)
        svc = p.service_name.format(tier=plan.name)
        if plan.head:
            pod_labels = labels("stage-head", plan.name)
            argv = specs[plan.name].argv(POD_HOST, ENGINE_PORT)
            container = _container(config, opts, "stage-head", argv,
                                   [(p.port_name, ENGINE_PORT)], [token_env()],
                                   "'127.0.0.1'")
            container.update(_head_probes(config, p.port_name))
            out += [replica_deployment(name, ns, pod_labels, container, replicas=1,
                                       grace=grace_s(config), extra_labels=pipeline),
                    service(svc, ns, pod_labels, [(p.port_name, ENGINE_PORT)]),
                    service(join_service_name(config), ns, pod_labels,
                            [(p.port_name, ENGINE_PORT)], publish_not_ready=True,
                            object_labels=labels("stage-join", plan.name)),
                    pdb(name, ns, pod_labels)]
            continue
        pod_labels = labels("stage", plan.name)
        argv = specs[plan.name].argv(f"$({POD_IP_ENV})", ENGINE_PORT)
        i = argv.index("--data-port")
        argv[i + 1] = str(STAGE_DATA_PORT)
        argv += ["--join", join]
        ports = [(p.port_name, ENGINE_PORT), ("frames", STAGE_DATA_PORT)]
        container = _container(config, opts, "stage", argv, ports,
                               [pod_ip_env(), token_env()], f"os.environ['{POD_IP_ENV}']")
        container.update(http_probes(config, p.port_name))
        replicas = None if name in managed else plan.initial_replicas
        out += [replica_deployment(name, ns, pod_labels, container, replicas=replicas,
                                   grace=grace_s(config), extra_labels=pipeline),
                service(svc, ns, pod_labels, ports),
                pdb(name, ns, pod_labels)]
    return out


def stage_policies(config: ClusterConfig, plans: list[StageTier], opts: RenderOptions,
                   controller: bool) -> list[dict[str, Any]]:
    """The head takes the gateway and its pipeline; stage links take only the pipeline.

    With the strata controller, it reads each stage replica's ``/load`` and drains the
    ones it removes over HTTP, never the frames.
    """
    tier = _pipeline(config)
    ns = opts.namespace
    own = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "strata",
                                           PIPELINE_LABEL: tier}}}
    head = network_policy(
        config.platform.deployment_name.format(tier=tier), ns, "stage-head",
        labels("stage-head", plans[0].name),
        [([component_peer("gateway"), own, *monitoring_peer(opts)], [ENGINE_PORT])])
    rules = [([own], [ENGINE_PORT, STAGE_DATA_PORT])]
    http_peers = [*([component_peer("controller")] if controller else []),
                  *monitoring_peer(opts)]  # /load, /drain, /metrics
    if http_peers:
        rules.append((http_peers, [ENGINE_PORT]))
    stages = network_policy(
        f"{config.platform.deployment_name.format(tier=tier)}-stages", ns, "stage",
        {"app.kubernetes.io/name": "strata", "app.kubernetes.io/component": "stage",
         PIPELINE_LABEL: tier}, rules)
    return [head, stages]
