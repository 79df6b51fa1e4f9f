"""``strata deploy render`` of a layer-range stage pipeline (deploy/cluster.pipeline.example.yaml).

Schema checks as in test_render.py (kubernetes-validate for core objects, the CRD field
schemas of crd_schemas.py for KEDA's ScaledObject); command lines are parsed by the real
``strata`` app and compared with the local platform's; the preStop hook runs against a
loopback server standing in for a stage replica.
"""

from __future__ import annotations

import http.server
import json
from typing import Any

import pytest
import yaml

from strata.config import parse_cluster_config
from strata.deploy.render import RenderError, render
from strata.deploy.stages import prestop_drain_wait
from strata.internal_auth import ENV_VAR, HEADER
from strata.stages.tiers import cluster_stage_specs
from tests.deploy.crd_schemas import validate_crd
from tests.deploy.test_render import (
    PIPELINE,
    _container,
    _one,
    _parse,
    loopback,
    validate_core,
)

HEAD, STAGE = "strata-pipeline", "strata-stage-15-30"


def _pipeline() -> dict[str, Any]:
    return yaml.safe_load(PIPELINE.read_text())


def _objects(autoscaler: str = "hpa", data: dict[str, Any] | None = None,
             **kw: Any) -> list[dict[str, Any]]:
    return render(_pipeline() if data is None else data, autoscaler=autoscaler, **kw)


@pytest.mark.parametrize("autoscaler", ["strata", "hpa", "keda"])
def test_pipeline_objects_pass_their_schemas(autoscaler: str) -> None:
    objects = _objects(autoscaler)
    validate_core(objects)
    for obj in objects:
        if obj["kind"] in ("ScaledObject", "ServiceMonitor"):
            validate_crd(obj)
    controller = [o for o in objects if o["kind"] == "Deployment"
                  and o["metadata"]["name"] == "strata-controller"]
    assert len(controller) == (autoscaler == "strata")


def test_commands_are_the_local_platforms_with_the_pods_address() -> None:
    objects = _objects()
    config = parse_cluster_config(_pipeline())
    t = config.tiers["pipeline"]
    assert isinstance(t.stages, list)
    local = cluster_stage_specs(config, "pipeline", t.stages, cores=1)
    head = _container(_one(objects, "Deployment", HEAD))["command"]
    want = local["pipeline"].argv("0.0.0.0", 8000)
    i = want.index("stage")
    j = want.index("--threads")
    assert head == ["strata", *want[i:j], *want[j + 2:]]  # threads: the pod's cores
    p = _parse(head).params
    assert (p["layers"], p["stages"], p["host"], p["port"]) == ("0:15", "0:15,15:30",
                                                                "0.0.0.0", 8000)
    assert int(p["kv_cache"]) == 256 << 20 and p["dtype"] == "float32"
    stage = _container(_one(objects, "Deployment", STAGE))
    p = _parse(stage["command"]).params
    # It tells the head where it serves: the pod's IP, not 0.0.0.0.
    assert (p["layers"], p["host"], p["port"], p["data_port"]) == ("15:30", "$(POD_IP)",
                                                                    8000, 9000)
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in (
        stage["env"])
    assert p["join"] == "http://strata-pipeline-join.strata.svc:8000"
    assert {c["name"]: c["containerPort"] for c in stage["ports"]} == {"http": 8000,
                                                                       "frames": 9000}
    for c in (stage, _container(_one(objects, "Deployment", HEAD))):
        assert {"name": ENV_VAR, "valueFrom": {"secretKeyRef": {
            "name": "strata-internal-token", "key": "token"}}} in c["env"]


def test_stages_join_a_head_that_is_not_ready_yet_and_the_gateway_routes_to_it() -> None:
    objects = _objects()
    head = _one(objects, "Deployment", HEAD)
    labels = head["spec"]["template"]["metadata"]["labels"]
    join = _one(objects, "Service", "strata-pipeline-join")["spec"]
    assert join["publishNotReadyAddresses"] is True
    assert join["selector"].items() <= labels.items()
    routed = _one(objects, "Service", HEAD)["spec"]
    assert "publishNotReadyAddresses" not in routed  # the gateway sees ready heads only
    gw = _parse(_container(_one(objects, "Deployment", "strata-gateway"))["command"]).params
    assert gw["kube_service"].format(tier=gw["tier"]) == HEAD
    # /health is 503 until every stage has a replica: only readiness may look at it.
    c = _container(head)
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "tcpSocket" in c["startupProbe"] and "tcpSocket" in c["livenessProbe"]


def test_stage_links_are_reachable_only_from_their_pipeline() -> None:
    objects = _objects()
    pol = _one(objects, "NetworkPolicy", "strata-pipeline-stages")["spec"]
    stage_labels = _one(objects, "Deployment", STAGE)["spec"]["template"]["metadata"][
        "labels"]
    head_labels = _one(objects, "Deployment", HEAD)["spec"]["template"]["metadata"]["labels"]
    assert pol["podSelector"]["matchLabels"].items() <= stage_labels.items()
    assert not pol["podSelector"]["matchLabels"].items() <= head_labels.items()
    frames = [r for r in pol["ingress"] if {"port": 9000, "protocol": "TCP"} in r["ports"]]
    (rule,) = frames
    (peer,) = rule["from"]
    # the pipeline's own pods: its head and the stage before (each forwards to the next)
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "strata",
                                                  "strata/pipeline": "pipeline"}
    assert peer["podSelector"]["matchLabels"].items() <= head_labels.items()
    assert peer["podSelector"]["matchLabels"].items() <= stage_labels.items()
    gw = _one(objects, "Deployment", "strata-gateway")["spec"]["template"]["metadata"]["labels"]
    assert not peer["podSelector"]["matchLabels"].items() <= gw.items()
    head_pol = _one(objects, "NetworkPolicy", HEAD)["spec"]
    (head_rule,) = head_pol["ingress"]
    assert {"podSelector": {"matchLabels": gw}} in head_rule["from"]


def test_stage_hpa_scales_on_the_busy_ratio_within_the_stage_bounds() -> None:
    objects = _objects()
    hpa = _one(objects, "HorizontalPodAutoscaler", STAGE)["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 3)
    (metric,) = hpa["metrics"]
    assert metric["pods"] == {"metric": {"name": "strata_stage_busy"},
                              "target": {"type": "AverageValue", "averageValue": "800m"}}
    assert hpa["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 300}}
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"
                and o["metadata"]["name"] == HEAD]  # one head per pipeline
    assert "replicas" not in _one(objects, "Deployment", STAGE)["spec"]
    assert _one(objects, "Deployment", HEAD)["spec"]["replicas"] == 1


def test_the_strata_controller_scales_the_stages_through_their_deployments() -> None:
    objects = _objects("strata")
    scale = _one(objects, "Role", "strata-controller")["rules"][0]
    assert scale["resources"] == ["deployments", "deployments/scale"]
    assert scale["resourceNames"] == [HEAD, STAGE]  # the tiers the controller looks up
    assert _one(objects, "Deployment", STAGE)["spec"]["replicas"] == 1  # adopted at start
    assert not [o for o in objects if o["kind"] in ("HorizontalPodAutoscaler",
                                                    "ScaledObject")]
    # It reads each stage replica's /load and drains it over HTTP, never the frames.
    pol = _one(objects, "NetworkPolicy", "strata-pipeline-stages")["spec"]
    ctl = _one(objects, "Deployment", "strata-controller")["spec"]["template"]["metadata"][
        "labels"]
    for rule in pol["ingress"]:
        if {"podSelector": {"matchLabels": ctl}} in rule["from"]:
            assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
            break
    else:
        raise AssertionError("the controller cannot reach the stage replicas")


def test_auto_stages_are_refused_and_fixed_stages_get_no_autoscaler() -> None:
    data = _pipeline()
    data["tiers"]["pipeline"]["stages"][1].update(min_replicas=2, max_replicas=2, replicas=2)
    objects = _objects("hpa", data)
    validate_core(objects)
    assert _one(objects, "Deployment", STAGE)["spec"]["replicas"] == 2
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    data = _pipeline()
    data["tiers"]["pipeline"] = {"stages": "auto", "num_stages": 2}
    with pytest.raises(RenderError, match="write the layer ranges out"):
        _objects("hpa", data)


def test_prestop_hook_drains_and_waits_for_the_pinned_sequences(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage hook, run against a loopback server that reports work for a while."""
    seen: list[tuple[str, str, str | None]] = []
    loads = [{"running": 2, "waiting": 0}, {"running": 1, "waiting": 1},
             {"running": 0, "waiting": 0}, {"running": 0, "waiting": 0}]

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 (the http.server hook's name)
            seen.append(("POST", self.path, self.headers.get(HEADER)))
            self._answer({"status": "draining"})

        def do_GET(self) -> None:  # noqa: N802
            seen.append(("GET", self.path, None))
            self._answer(loads.pop(0) if loads else {"running": 0, "waiting": 0})

        def log_message(self, *args: Any) -> None:
            pass

    with loopback(Handler) as port:
        hook = prestop_drain_wait("os.environ['POD_IP']", port, 30)
        code = hook["exec"]["command"][2]
        assert code == _container(_one(_objects(), "Deployment", STAGE))["lifecycle"][
            "preStop"]["exec"]["command"][2].replace(":8000'", f":{port}'").replace(
            "+60;", "+30;")
        monkeypatch.setenv(ENV_VAR, "s3cret")
        monkeypatch.setenv("POD_IP", "127.0.0.1")
        exec(compile(code, "preStop", "exec"), {})  # noqa: S102 (our own rendered hook)
    assert seen[0] == ("POST", "/drain", "s3cret")
    assert [s[1] for s in seen[1:]] == ["/load"] * 4  # returned after two idle reads
