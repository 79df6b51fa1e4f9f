"""``strata deploy render``: the cluster file as Kubernetes objects.

No API server runs here, so the objects are checked against the Kubernetes OpenAPI schema
(``kubernetes-validate``, strict: unknown fields fail), against what
``strata.platform.kubernetes`` looks up (names, port), and every command line is parsed by
the real ``strata`` Typer app. A golden file per example cluster file (and autoscaler
choice) pins the whole output (regenerate them with ``STRATA_REGEN_GOLDEN=1``). Stage
pipelines, autoscalers and monitoring have their own test files next to this one.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import typer
import yaml
from typer.testing import CliRunner

from strata.cli import app as strata_app
from strata.config import parse_cluster_config
from strata.deploy.render import RenderError, render, to_yaml
from strata.internal_auth import ENV_VAR, HEADER

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "cluster.example.yaml"
PIPELINE = ROOT / "deploy" / "cluster.pipeline.example.yaml"
MODELS = ROOT / "deploy" / "cluster.models.example.yaml"
GOLDEN_DIR = Path(__file__).parent / "golden"
K8S_VERSION = "1.31.0"
# Custom resources: kubernetes-validate knows only the core schemas (see crd_schemas.py).
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}
# Read by Prometheus' and Grafana's helpers, which watch their own namespace.
MONITORING_NAMESPACED = {"strata-prometheus-adapter", "strata-dashboard"}


def _example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def _objects(data: dict[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
    return render(_example() if data is None else data, **kw)


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _parse(argv: list[str]) -> click.Context:
    """Parse ``argv`` (``strata <command> ...``) with the real CLI, without running it."""
    assert argv[0] == "strata"
    group = typer.main.get_command(strata_app)
    with click.Context(group) as ctx:
        cmd = group.get_command(ctx, argv[1])
        assert cmd is not None, f"strata has no command {argv[1]!r}"
        known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
        flags = [a for a in argv[2:] if a.startswith("-")]
        assert set(flags) <= known, f"unknown flags: {set(flags) - known}"
        return cmd.make_context(argv[1], list(argv[2:]), parent=ctx)


def validate_core(objects: list[dict[str, Any]], namespace: str = "strata") -> None:
    """Every core object against the strict 1.31 schema; each in ``namespace``."""
    assert objects[0]["kind"] == "Namespace"  # created before what lives in it
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        if obj["kind"] == "Namespace":
            continue
        # prometheus-adapter reads its rules from its own namespace
        expected = "monitoring" if obj["metadata"]["name"] in MONITORING_NAMESPACED \
            else namespace
        assert obj["metadata"]["namespace"] == expected, obj["metadata"]


@pytest.mark.parametrize("autoscaler", ["strata", "hpa", "keda"])
def test_every_object_passes_the_strict_kubernetes_schema(autoscaler: str) -> None:
    validate_core(_objects(autoscaler=autoscaler))


def test_a_bad_object_fails_the_schema() -> None:
    """The check above can fail: strict mode rejects a misspelled field."""
    deployment = _one(_objects(), "Deployment", "strata-engine")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_names_and_port_are_the_ones_the_kubernetes_platform_looks_up() -> None:
    data = _example()
    data["platform"] = {**data["platform"], "deployment_name": "llm-{tier}",
                        "service_name": "llm-{tier}-svc"}
    objects = _objects(data, namespace="prod")
    config = parse_cluster_config(yaml.safe_load(
        _one(objects, "ConfigMap", "strata-cluster")["data"]["cluster.yaml"]))
    opts = config.platform
    assert (opts.kind, opts.namespace, opts.kube_auth) == ("kubernetes", "prod", "in-cluster")
    deployment = _one(objects, "Deployment", opts.deployment_name.format(tier="engine"))
    service = _one(objects, "Service", opts.service_name.format(tier="engine"))
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector
    assert deployment["spec"]["template"]["metadata"]["labels"] == selector
    assert [p["name"] for p in service["spec"]["ports"]] == [opts.port_name]
    assert [p["name"] for p in _container(deployment)["ports"]] == [opts.port_name]
    gateway = _parse(_container(_one(objects, "Deployment", "strata-gateway"))["command"])
    assert gateway.params["kube_service"] == "llm-{tier}-svc"
    assert gateway.params["kube_namespace"] == "prod"
    role = _one(objects, "Role", "strata-controller")
    assert role["rules"][0]["resourceNames"] == ["llm-engine"]


def test_roles_are_namespaced_and_least_privilege() -> None:
    objects = _objects()
    assert not [o for o in objects if o["kind"].startswith("Cluster")]
    role = _one(objects, "Role", "strata-controller")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    assert set(rules) == {(("apps",), ("deployments", "deployments/scale")),
                          (("discovery.k8s.io",), ("endpointslices",)), (("",), ("pods",))}
    scale = rules[(("apps",), ("deployments", "deployments/scale"))]
    assert scale["resourceNames"] == ["strata-engine"]
    assert set(scale["verbs"]) == {"get", "update", "patch"}
    assert set(rules[(("discovery.k8s.io",), ("endpointslices",))]["verbs"]) == {
        "get", "list", "watch"}
    assert set(rules[(("",), ("pods",))]["verbs"]) == {"get", "list", "watch", "patch",
                                                       "delete"}
    gateway_role = _one(objects, "Role", "strata-gateway")
    assert gateway_role["rules"] == [{"apiGroups": ["discovery.k8s.io"],
                                      "resources": ["endpointslices"],
                                      "verbs": ["get", "list", "watch"]}]
    for name in ("strata-controller", "strata-gateway"):
        binding = _one(objects, "RoleBinding", name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                      "kind": "Role", "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name,
                                        "namespace": "strata"}]
    engine = _one(objects, "Deployment", "strata-engine")["spec"]["template"]["spec"]
    assert engine["automountServiceAccountToken"] is False


def test_engine_pod_drains_before_it_is_killed() -> None:
    objects = _objects()
    config = parse_cluster_config(_example())
    engine = _one(objects, "Deployment", "strata-engine")
    spec = engine["spec"]["template"]["spec"]
    drain = config.platform.drain_timeout_s
    assert spec["terminationGracePeriodSeconds"] >= drain + config.platform.stop_timeout_s
    c = _container(engine)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    # Startup allows the file's whole start timeout for the model to load.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= (
        config.platform.start_timeout_s)
    # /health is 503 while draining: liveness must not kill a pod within its grace period.
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > spec[
        "terminationGracePeriodSeconds"]
    (hook_cmd,) = [c["lifecycle"]["preStop"]["exec"]["command"]]
    assert hook_cmd[:2] == ["python", "-c"]
    compile(hook_cmd[2], "preStop", "exec")
    assert "/drain" in hook_cmd[2] and HEADER in hook_cmd[2] and ENV_VAR in hook_cmd[2]
    assert {"name": ENV_VAR, "valueFrom": {"secretKeyRef": {
        "name": "strata-internal-token", "key": "token"}}} in c["env"]
    pdb = _one(objects, "PodDisruptionBudget", "strata-engine")
    assert pdb["spec"] == {"maxUnavailable": 1,
                           "selector": engine["spec"]["selector"]}
    assert engine["spec"]["replicas"] == config.tiers["engine"].initial_replicas


def test_engine_command_is_the_local_platforms_and_parses() -> None:
    data = _example()
    data["engine"] = {**data["engine"], "threads": 3, "max_model_len": 1024,
                      "prefix_caching": False}
    objects = _objects(data, image="registry.example/strata:1.2")
    c = _container(_one(objects, "Deployment", "strata-engine"))
    assert c["image"] == "registry.example/strata:1.2"
    ctx = _parse(c["command"])
    p = ctx.params
    assert (p["host"], p["port"], p["threads"]) == ("0.0.0.0", 8000, 3)
    assert (p["max_model_len"], p["prefix_caching"], p["drain_timeout_s"]) == (
        1024, False, 120.0)
    assert int(p["kv_cache"]) == 1 << 30
    assert c["resources"]["requests"]["cpu"] == "3"
    # Threads unset: the engine measures the pod's cores itself.
    default = _parse(_container(_one(_objects(), "Deployment", "strata-engine"))["command"])
    assert default.params["threads"] is None


def test_gateway_and_controller_commands_parse() -> None:
    data = _example()
    data["routing"] = {"policy": "prefix_affinity", "params": {"load_factor": 1.5}}
    objects = _objects(data)
    gw = _container(_one(objects, "Deployment", "strata-gateway"))
    p = _parse(gw["command"]).params
    assert (p["endpoints_from"], p["host"], p["port"]) == ("kubernetes", "0.0.0.0", 8000)
    assert (p["policy"], p["policy_param"]) == ("prefix_affinity", ["load_factor=1.5"])
    assert p["served_model_name"] == ["SmolLM2-135M-Instruct"]
    assert p["hold_timeout_s"] == 60.0
    assert {"name": ENV_VAR, "valueFrom": {"secretKeyRef": {
        "name": "strata-internal-token", "key": "token"}}} in gw["env"]
    ctl = _container(_one(objects, "Deployment", "strata-controller"))
    p = _parse(ctl["command"]).params
    assert str(p["file"]) == "/etc/strata/cluster.yaml"
    assert p["gateway_url"] == "http://strata-gateway.strata.svc:8000"
    assert ctl["volumeMounts"][0]["mountPath"] == "/etc/strata"
    # Its scaling series for the dashboard, on a port only the monitoring namespace reaches.
    assert p["metrics_port"] == 9100
    assert ctl["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
    svc = _one(objects, "Service", "strata-controller")["spec"]
    assert svc["ports"][0]["targetPort"] == "metrics"
    (rule,) = _one(objects, "NetworkPolicy", "strata-controller")["spec"]["ingress"]
    assert rule == {"from": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"port": 9100, "protocol": "TCP"}]}


def test_network_policies_open_the_gateway_and_close_the_engines() -> None:
    objects = _objects()
    gw = _one(objects, "NetworkPolicy", "strata-gateway")["spec"]
    assert gw["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    eng = _one(objects, "NetworkPolicy", "strata-engines")["spec"]
    engine_labels = _one(objects, "Deployment", "strata-engine")["spec"]["selector"][
        "matchLabels"]
    assert eng["podSelector"]["matchLabels"].items() <= engine_labels.items()
    (rule,) = eng["ingress"]
    components = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                  for peer in rule["from"] if "podSelector" in peer}
    assert components == {"gateway", "controller"}
    # Prometheus scrapes each engine's /metrics: its namespace, and nothing else, is let in.
    (ns_peer,) = [peer for peer in rule["from"] if "podSelector" not in peer]
    assert ns_peer == {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}
    closed = _objects(monitoring=False)
    (rule,) = _one(closed, "NetworkPolicy", "strata-engines")["spec"]["ingress"]
    assert all("podSelector" in peer for peer in rule["from"])
    assert not [o for o in closed if o["kind"] == "ServiceMonitor"]


def test_gateways_run_active_active_on_different_nodes() -> None:
    data = _example()
    data.setdefault("gateway", {})["replicas"] = 3
    objects = _objects(data)
    spec = _one(objects, "Deployment", "strata-gateway")["spec"]
    assert spec["replicas"] == 3
    term = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    budget = _one(objects, "PodDisruptionBudget", "strata-gateway")["spec"]
    assert budget["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    data["gateway"]["replicas"] = 1  # one gateway: a budget of one unavailable guards nothing
    assert not [o for o in _objects(data) if o["kind"] == "PodDisruptionBudget"
                and o["metadata"]["name"] == "strata-gateway"]


def test_local_paths_and_reserved_names_are_refused() -> None:
    data = _example()
    data["gateway"] = {**data["gateway"], "api_keys_file": "keys.yaml"}
    with pytest.raises(RenderError, match="api_keys_file"):
        render(data)
    data = _example()
    data["tiers"] = {"gateway": data["tiers"]["engine"]}
    with pytest.raises(RenderError, match="taken by strata's own gateway"):
        render(data)
    with pytest.raises(RenderError, match="use strata, hpa or keda"):
        render(_example(), autoscaler="vpa")


def test_the_token_secret_is_rendered_only_when_asked() -> None:
    import base64

    assert not [o for o in _objects() if o["kind"] == "Secret"]
    first = _one(_objects(with_secret=True), "Secret", "strata-internal-token")
    second = _one(_objects(with_secret=True), "Secret", "strata-internal-token")
    kubernetes_validate.validate(first, K8S_VERSION, strict=True)
    token = base64.b64decode(first["data"]["token"]).decode()
    assert len(token) >= 43 and token.replace("-", "").replace("_", "").isalnum()
    assert first["data"] != second["data"]  # fresh on every render: hence not by default
    objects = _objects(with_secret=True)
    assert [o["kind"] for o in objects[:2]] == ["Namespace", "Secret"]  # before its readers


def test_the_dashboard_is_rendered_next_to_grafana() -> None:
    import json

    from strata.deploy.dashboard import dashboard_configmap

    objects = _objects(namespace="team-a")
    cm = _one(objects, "ConfigMap", "strata-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's label
    config = parse_cluster_config(yaml.safe_load(
        _one(objects, "ConfigMap", "strata-cluster")["data"]["cluster.yaml"]))
    assert cm["data"] == dashboard_configmap(config, "team-a")["data"]
    board = json.loads(cm["data"]["strata.json"])
    (ns,) = [v for v in board["templating"]["list"] if v["name"] == "namespace"]
    assert ns["current"]["value"] == "team-a"  # opens on this cluster
    assert not [o for o in _objects(monitoring=False) if o["kind"] == "ConfigMap"
                and o["metadata"]["name"] == "strata-dashboard"]


# (example file, autoscaler) -> golden file: every example, and each autoscaler form once.
GOLDENS = [
    (EXAMPLE, "strata", "cluster.example.yaml"),
    (EXAMPLE, "hpa", "cluster.example.hpa.yaml"),
    (EXAMPLE, "keda", "cluster.example.keda.yaml"),
    (PIPELINE, "strata", "cluster.pipeline.example.yaml"),
    (PIPELINE, "hpa", "cluster.pipeline.example.hpa.yaml"),
    (MODELS, "strata", "cluster.models.example.yaml"),
    (MODELS, "keda", "cluster.models.example.keda.yaml"),
]


@pytest.mark.parametrize(("example", "autoscaler", "golden"), GOLDENS)
def test_golden_file(example: Path, autoscaler: str, golden: str) -> None:
    objects = render(yaml.safe_load(example.read_text()), autoscaler=autoscaler)
    # The dashboard's JSON is pinned by its own module's tests (test_dashboard.py).
    for obj in objects:
        if obj["metadata"]["name"] == "strata-dashboard":
            obj["data"] = {key: "(strata.deploy.dashboard)" for key in obj["data"]}
    text = to_yaml(objects)
    path = GOLDEN_DIR / golden
    if os.environ.get("STRATA_REGEN_GOLDEN") == "1":
        path.write_text(text)
    assert path.read_text() == text, (
        f"rendered manifests of {example.name} changed; if intended, rerun with "
        "STRATA_REGEN_GOLDEN=1")


def test_cli_writes_one_file_per_object_or_a_stream(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "manifests"
    res = runner.invoke(strata_app, ["deploy", "render", "-f", str(EXAMPLE), "-o", str(out),
                                     "--namespace", "team-a", "--image", "strata:test"])
    assert res.exit_code == 0, res.output
    files = sorted(out.iterdir())
    objects = _objects(namespace="team-a", image="strata:test")
    assert len(files) == len(objects)
    assert [yaml.safe_load(f.read_text()) for f in files] == objects
    res = runner.invoke(strata_app, ["deploy", "render", "-f", str(EXAMPLE)])
    assert res.exit_code == 0, res.output
    assert list(yaml.safe_load_all(res.stdout)) == _objects()
    res = runner.invoke(strata_app, ["deploy", "render", "-f", str(EXAMPLE), "--autoscaler",
                                     "keda", "--with-secret", "--no-monitoring",
                                     "--monitoring-namespace", "obs"])
    assert res.exit_code == 0, res.output
    kinds = [o["kind"] for o in yaml.safe_load_all(res.stdout)]
    assert "ScaledObject" in kinds and "Secret" in kinds and "ServiceMonitor" not in kinds
    res = runner.invoke(strata_app, ["deploy", "render", "-f", str(PIPELINE)])
    assert res.exit_code == 0, res.output
    assert "name: strata-stage-15-30" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: {engine: {replicaz: 2}}\n")
    res = runner.invoke(strata_app, ["deploy", "render", "-f", str(bad)])
    assert res.exit_code == 2
    assert "replicaz" in res.output


@contextlib.contextmanager
def loopback(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """``handler`` served on a free loopback port (standing in for a pod); yields the port."""
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_prestop_hook_posts_drain_with_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook's one-liner, run against a loopback server standing in for the engine."""
    from strata.deploy.render import ENGINE_PORT, _prestop_drain

    seen: list[tuple[str, str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server hook's name)
            seen.append(("POST", self.path, self.headers.get(HEADER)))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    with loopback(Handler) as port:
        code = _prestop_drain(port)["exec"]["command"][2]
        assert code == _prestop_drain(ENGINE_PORT)["exec"]["command"][2].replace(
            f":{ENGINE_PORT}/", f":{port}/")
        monkeypatch.setenv(ENV_VAR, "s3cret")
        exec(compile(code, "preStop", "exec"), {})  # noqa: S102 (our own rendered hook)
    assert seen == [("POST", "/drain", "s3cret")]
