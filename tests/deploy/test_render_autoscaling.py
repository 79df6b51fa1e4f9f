"""``strata deploy render --autoscaler hpa|keda`` and the ServiceMonitor.

Core objects (HPAs, the adapter's ConfigMap) are checked with ``kubernetes-validate``
against the 1.31 schema; KEDA's ScaledObject and prometheus-operator's ServiceMonitor are
custom resources it has no schema for, so their structure is checked against the fields
their CRDs define (``tests/deploy/crd_schemas.py``). The series the rules and queries
name are checked against what a real engine and a real gateway serve on ``/metrics``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from strata.deploy.render import RenderError, render
from tests.binaries import required_binary
from tests.deploy.crd_schemas import validate_crd
from tests.deploy.test_render import _example, _one, validate_core


def _llm_example(**autoscaling: Any) -> dict[str, Any]:
    data = _example()
    block = data["tiers"]["engine"]["autoscaling"]
    data["tiers"]["engine"]["autoscaling"] = {**block, **autoscaling}
    return data


def _hpa_metrics(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    hpa = _one(objects, "HorizontalPodAutoscaler", "strata-engine")
    out = {}
    for m in hpa["spec"]["metrics"]:
        source = m[m["type"].lower()]
        out[source["metric"]["name"]] = {"type": m["type"], **source["target"]}
    return out


def _adapter(objects: list[dict[str, Any]]) -> dict[str, Any]:
    cm = _one(objects, "ConfigMap", "strata-prometheus-adapter")
    return yaml.safe_load(cm["data"]["config.yaml"])


def test_llm_policy_maps_onto_hpa_metrics_with_the_files_targets() -> None:
    objects = render(_example(), autoscaler="hpa")
    validate_core(objects)
    assert _hpa_metrics(objects) == {
        "strata_kv_usage": {"type": "AverageValue", "averageValue": "750m"},  # target_kv_usage
        "strata_waiting": {"type": "AverageValue", "averageValue": "2"},
        "strata_ttft_p90_seconds": {"type": "Value", "value": "2"},  # slos.ttft_s
        "strata_tpot_p90_seconds": {"type": "Value", "value": "200m"},  # slos.tpot_s
    }
    hpa = _one(objects, "HorizontalPodAutoscaler", "strata-engine")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 2)
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "strata-engine"}
    assert hpa["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 60}}
    kinds = {m["type"] for m in hpa["metrics"]}
    assert kinds == {"Pods", "External"}
    data = _example()
    data["slos"] = {**data["slos"], "percentile": 99.5}
    objects = render(data, autoscaler="hpa")
    names = set(_hpa_metrics(objects))
    assert {"strata_ttft_p99_5_seconds", "strata_tpot_p99_5_seconds"} <= names
    rules = _adapter(objects)["externalRules"]
    assert [r for r in rules if "histogram_quantile(0.995," in r["metricsQuery"]]


def test_hpa_and_keda_replace_the_controller() -> None:
    for autoscaler in ("hpa", "keda"):
        objects = render(_example(), autoscaler=autoscaler)
        names = {(o["kind"], o["metadata"]["name"]) for o in objects}
        assert ("Deployment", "strata-controller") not in names
        assert ("Role", "strata-controller") not in names
        engine = _one(objects, "Deployment", "strata-engine")
        # A re-apply must not reset the count the autoscaler chose.
        assert "replicas" not in engine["spec"]
        (rule,) = _one(objects, "NetworkPolicy", "strata-engines")["spec"]["ingress"]
        assert {p.get("podSelector", {}).get("matchLabels", {}).get(
            "app.kubernetes.io/component") for p in rule["from"]} == {"gateway", None}
    strata = render(_example())
    assert _one(strata, "Deployment", "strata-engine")["spec"]["replicas"] == 1
    assert not [o for o in strata if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]


def test_every_hpa_metric_has_one_well_formed_adapter_rule() -> None:
    data = _example()
    data["tiers"]["engine"]["autoscaling"] = {
        "policy": "hpa", "min_replicas": 1, "max_replicas": 4, "metrics": [
            {"name": "kv_usage", "type": "Utilization", "average_utilization": 70},
            {"name": "concurrency", "type": "AverageValue", "average_value": 8},
            {"name": "tokens_per_s", "type": "AverageValue", "average_value": 500},
            {"name": "pending_requests", "source": "tier", "type": "Value", "value": 4},
            {"name": "tpot_p90_s", "source": "tier", "type": "Value", "value": 0.1}]}
    objects = render(data, autoscaler="hpa")
    validate_core(objects)
    metrics = _hpa_metrics(objects)
    assert metrics["strata_kv_usage"] == {"type": "AverageValue", "averageValue": "700m"}
    assert metrics["strata_pending_requests"] == {"type": "Value", "value": "4"}
    adapter = _adapter(objects)
    by_name = {}
    for section, scope in (("rules", "Pods"), ("externalRules", "External")):
        for rule in adapter[section]:
            assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
            assert "<<.LabelMatchers>>" in rule["metricsQuery"]
            assert re.fullmatch(r"strata_\w+\{namespace!=\"\"(,pod!=\"\")?\}",
                                rule["seriesQuery"])
            series = rule["seriesQuery"].split("{")[0]
            assert re.match(rule["name"]["matches"], series)
            overrides = rule["resources"]["overrides"]
            assert overrides["namespace"] == {"resource": "namespace"}
            if scope == "Pods":
                assert overrides["pod"] == {"resource": "pod"}
                assert "by (<<.GroupBy>>)" in rule["metricsQuery"]
            assert rule["name"]["as"] not in by_name
            by_name[rule["name"]["as"]] = scope
    hpa = _one(objects, "HorizontalPodAutoscaler", "strata-engine")
    assert {m[m["type"].lower()]["metric"]["name"]: m["type"]
            for m in hpa["spec"]["metrics"]} == by_name


def test_what_a_native_hpa_cannot_do_is_refused_with_the_fix() -> None:
    with pytest.raises(RenderError, match="use --autoscaler keda"):
        render(_llm_example(min_replicas=0), autoscaler="hpa")
    with pytest.raises(RenderError, match="tolerance"):
        render(_llm_example(behavior={"scaleUp": {"tolerance": 0.05}}), autoscaler="hpa")
    data = _example()
    data["tiers"]["engine"]["autoscaling"] = {
        "policy": "hpa", "max_replicas": 3, "metrics": [
            {"name": "waiting_prompt_tokens", "type": "AverageValue", "average_value": 100}]}
    with pytest.raises(RenderError, match="not on an engine's /metrics"):
        render(data, autoscaler="keda")


def test_keda_scaled_object_fits_its_crd_and_scales_to_zero() -> None:
    objects = render(_llm_example(min_replicas=0, scale_to_zero_grace_s=45),
                     autoscaler="keda")
    validate_core(objects)
    so = _one(objects, "ScaledObject", "strata-engine")
    validate_crd(so)
    spec = so["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 2)
    assert spec["cooldownPeriod"] == 45 and spec["pollingInterval"] == 15
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == {
        "scaleDown": {"stabilizationWindowSeconds": 60}}
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert {t["type"] for t in triggers.values()} == {"prometheus"}
    kv = triggers["strata-kv-usage"]
    assert kv["metricType"] == "AverageValue" and kv["metadata"]["threshold"] == "0.75"
    assert 'namespace="strata",service="strata-engine"' in kv["metadata"]["query"]
    # The queue counts what the gateway holds, so it is what wakes a tier at zero.
    waiting = triggers["strata-waiting"]["metadata"]["query"]
    assert "strata_gateway_queue_depth" in waiting
    assert triggers["strata-ttft-p90-seconds"]["metricType"] == "Value"
    for t in triggers.values():
        assert t["metadata"]["serverAddress"] == (
            "http://prometheus-operated.monitoring.svc:9090")
    # An hpa-policy tier at zero gets a trigger on the gateway's queue to wake it.
    data = _example()
    data["tiers"]["engine"]["autoscaling"] = {"policy": "hpa", "min_replicas": 0,
                                              "max_replicas": 2}
    so = _one(render(data, autoscaler="keda"), "ScaledObject", "strata-engine")
    validate_crd(so)
    wake = {t["name"]: t for t in so["spec"]["triggers"]}["gateway-queue"]["metadata"]
    assert wake["activationThreshold"] == "0" and "strata_gateway_queue_depth" in wake["query"]


def test_the_crd_checks_can_fail() -> None:
    so = _one(render(_example(), autoscaler="keda"), "ScaledObject", "strata-engine")
    so["spec"]["minReplicas"] = 1  # an HPA field, not KEDA's minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(so)
    sm = _one(render(_example()), "ServiceMonitor", "strata")
    del sm["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(sm)


def test_service_monitor_selects_the_metrics_ports_of_every_strata_service() -> None:
    objects = render(_example())
    sm = _one(objects, "ServiceMonitor", "strata")
    validate_crd(sm)
    spec = sm["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["strata"]}
    (expr,) = spec["selector"]["matchExpressions"]
    selected = [s for s in objects if s["kind"] == "Service"
                and spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
                and s["metadata"]["labels"]["app.kubernetes.io/component"] in expr["values"]]
    assert {s["metadata"]["name"] for s in selected} == {"strata-engine", "strata-gateway",
                                                         "strata-controller"}
    ports = {e["port"] for e in spec["endpoints"]}
    for svc in selected:
        assert ports & {p["name"] for p in svc["spec"]["ports"]}
    assert {e["path"] for e in spec["endpoints"]} == {"/metrics"}
    assert not any("bearerTokenSecret" in e or "authorization" in e for e in spec["endpoints"])


def _series_in(objects: list[dict[str, Any]]) -> set[str]:
    """Every ``strata_`` series a rendered rule or query names."""
    text = ""
    for o in objects:
        if o["kind"] == "ScaledObject":
            text += " ".join(t["metadata"]["query"] for t in o["spec"]["triggers"])
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "strata-prometheus-adapter":
            config = yaml.safe_load(o["data"]["config.yaml"])
            text += " ".join(r["seriesQuery"] + " " + r["metricsQuery"]
                             for r in config["rules"] + config["externalRules"])
    return set(re.findall(r"\bstrata_[a-z0-9_]+", text))


async def test_queried_series_are_served_by_a_real_engine_and_gateway(
        tiny_hf_dir: Path) -> None:
    """A real engine (tiny model, internal token set) behind a real gateway, on loopback.

    /metrics answers without the token on both (so the ServiceMonitor needs none), and
    every series the HPA rules and KEDA queries name is there after one request (a
    labelled gauge not used yet is declared). The stage busy ratio is a stage replica's,
    not checked here.
    """
    from tests.engine.test_metrics import serve_engine
    from tests.gateway.servers import completion, gateway

    data = _example()
    data["tiers"]["engine"]["autoscaling"] = {
        "policy": "hpa", "min_replicas": 1, "max_replicas": 4, "metrics": [
            {"name": m, "type": "AverageValue", "average_value": 1} for m in (
                "kv_usage", "running", "waiting", "concurrency", "prompt_tokens_per_s",
                "generation_tokens_per_s", "tokens_per_s")] + [
            {"name": m, "source": "tier", "type": "Value", "value": 1} for m in (
                "pending_requests", "in_flight_requests", "concurrency", "ttft_p90_s",
                "tpot_p90_s")]}
    wanted = set()
    for autoscaler in ("hpa", "keda"):
        wanted |= _series_in(render(data, autoscaler=autoscaler))
    wanted |= _series_in(render(_example(), autoscaler="hpa"))
    kpa = _example()
    kpa["tiers"]["engine"]["autoscaling"] = {"policy": "kpa", "metric": "rps",
                                             "max_replicas": 2}
    wanted |= _series_in(render(kpa, autoscaler="keda"))
    assert "strata_kv_cache_usage_ratio" in wanted and "strata_requests_total" in wanted

    async with serve_engine(tiny_hf_dir, max_num_seqs=4, max_model_len=256,
                            internal_token="s3cret") as (url, model_name), \
            gateway([url]) as (_, client), httpx.AsyncClient(timeout=30) as http:
        resp = await client.post("/v1/completions",
                                 json=completion(model=model_name, max_tokens=8, stream=True,
                                                 ignore_eos=True))
        assert resp.status_code == 200, resp.text
        served: set[str] = set()
        for base in (url, str(client.base_url)):
            page = await http.get(base.rstrip("/") + "/metrics")
            assert page.status_code == 200  # no token sent
            for family in text_string_to_metric_families(page.text):
                served |= {s.name for s in family.samples}
                if family.type == "gauge":
                    # a labelled gauge has no sample before its first use (the
                    # gateway's queue depth until a request waits): declared is enough
                    served.add(family.name)
    assert wanted - served == set()


def _every_expression() -> list[str]:
    """Every PromQL the HPA rules and KEDA triggers carry, over each policy's mapping.

    Adapter templates get what prometheus-adapter substitutes (a namespace and pod
    matcher, the pod grouping, the series name).
    """
    variants = [_example(), _llm_example(min_replicas=0)]
    data = _example()
    data["tiers"]["engine"]["autoscaling"] = {
        "policy": "hpa", "min_replicas": 1, "max_replicas": 4, "metrics": [
            {"name": m, "type": "AverageValue", "average_value": 1} for m in (
                "kv_usage", "running", "waiting", "concurrency", "tokens_per_s")] + [
            {"name": m, "source": "tier", "type": "Value", "value": 1} for m in (
                "pending_requests", "in_flight_requests", "concurrency", "ttft_p90_s",
                "tpot_p90_s")]}
    variants.append(data)
    for metric in ("concurrency", "rps"):
        kpa = _example()
        kpa["tiers"]["engine"]["autoscaling"] = {"policy": "kpa", "metric": metric,
                                                 "min_replicas": 1, "max_replicas": 2}
        variants.append(kpa)
    pipeline = yaml.safe_load((Path(__file__).parents[2] / "deploy"
                               / "cluster.pipeline.example.yaml").read_text())
    exprs: list[str] = []
    for variant in [*variants, pipeline]:
        for obj in render(variant, autoscaler="keda"):
            if obj["kind"] == "ScaledObject":
                exprs += [t["metadata"]["query"] for t in obj["spec"]["triggers"]]
        if variant is variants[1]:
            continue  # min_replicas 0: KEDA only
        config = _adapter(render(variant, autoscaler="hpa"))
        for rule in config["rules"] + config["externalRules"]:
            series = rule["seriesQuery"].split("{")[0]
            exprs.append(rule["seriesQuery"])
            exprs.append(rule["metricsQuery"]
                         .replace("<<.LabelMatchers>>", 'namespace="strata",pod=~"a|b"')
                         .replace("<<.GroupBy>>", "pod").replace("<<.Series>>", series))
    return sorted(set(exprs))


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    import subprocess

    promtool = required_binary("promtool")
    exprs = _every_expression()
    assert len(exprs) > 20
    rules = {"groups": [{"name": "strata-autoscaling", "rules": [
        {"record": f"strata:autoscaling:{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")],  # noqa: S603
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(exprs)} rules found" in done.stdout
