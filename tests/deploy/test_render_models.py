"""``strata deploy render`` of several models in one cluster (deploy/cluster.models.example.yaml).

Each tier is its own Deployment/Service/PDB with its own model and engine options; one
gateway watches every tier's Service and routes by model (``--tier-model``); the
autoscaling objects of each tier read that tier's series only.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import yaml

from strata.config import parse_cluster_config
from strata.deploy.render import render
from tests.deploy.crd_schemas import validate_crd
from tests.deploy.test_render import (
    CRD_KINDS,
    MODELS,
    _container,
    _one,
    _parse,
    validate_core,
)


def _models(**changes: Any) -> dict[str, Any]:
    data = yaml.safe_load(MODELS.read_text())
    for tier, fields in changes.items():
        data["tiers"][tier]["autoscaling"].update(fields)
    return data


def _render(autoscaler: str) -> list[dict[str, Any]]:
    # A native HPA cannot scale to zero: the hpa form keeps one batch replica.
    data = _models(batch={"min_replicas": 1}) if autoscaler == "hpa" else _models()
    return render(data, autoscaler=autoscaler)


@pytest.mark.parametrize("autoscaler", ["strata", "hpa", "keda"])
def test_every_object_is_valid_and_named_once(autoscaler: str) -> None:
    objects = _render(autoscaler)
    validate_core(objects)
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            validate_crd(obj)
    names = Counter((o["kind"], o["metadata"]["name"]) for o in objects)
    assert [k for k, n in names.items() if n > 1] == []


def test_each_tier_runs_its_own_model_and_engine_options() -> None:
    objects = _render("strata")
    chat = _parse(_container(_one(objects, "Deployment", "strata-chat"))["command"]).params
    batch = _parse(_container(_one(objects, "Deployment", "strata-batch"))["command"]).params
    assert (chat["served_model_name"], batch["served_model_name"]) == ("smol-chat", "smol-batch")
    assert (chat["max_num_seqs"], batch["max_num_seqs"]) == (64, 16)
    assert _one(objects, "Deployment", "strata-chat")["spec"]["replicas"] == 1
    assert _one(objects, "Deployment", "strata-batch")["spec"]["replicas"] == 0
    for tier in ("chat", "batch"):
        svc = _one(objects, "Service", f"strata-{tier}")
        assert svc["metadata"]["labels"]["strata/tier"] == tier
        _one(objects, "PodDisruptionBudget", f"strata-{tier}")


def test_one_gateway_routes_every_tier_and_the_controller_scales_each() -> None:
    objects = _render("strata")
    gw = _parse(_container(_one(objects, "Deployment", "strata-gateway"))["command"]).params
    assert gw["tier_model"] == ["chat=smol-chat", "batch=smol-batch"]
    assert gw["kube_service"] == "strata-{tier}" and gw["served_model_name"] == []
    (rule, *_) = _one(objects, "Role", "strata-controller")["rules"]
    assert rule["resourceNames"] == ["strata-batch", "strata-chat"]
    cluster = parse_cluster_config(yaml.safe_load(
        _one(objects, "ConfigMap", "strata-cluster")["data"]["cluster.yaml"]))
    assert cluster.served_models() == {"smol-chat": "chat", "smol-batch": "batch"}
    engines = _one(objects, "NetworkPolicy", "strata-engines")["spec"]["podSelector"]
    assert "strata/tier" not in engines["matchLabels"]  # one policy covers every tier


def test_each_tiers_autoscaler_reads_its_own_series() -> None:
    keda = _render("keda")
    chat = _one(keda, "ScaledObject", "strata-chat")["spec"]["triggers"]
    batch = _one(keda, "ScaledObject", "strata-batch")["spec"]["triggers"]
    gateway_queries = [t["metadata"]["query"] for t in chat + batch
                       if "service=\"strata-gateway\"" in t["metadata"]["query"]]
    assert gateway_queries
    for q in gateway_queries:  # never the whole gateway's queue or TTFT
        assert 'model="smol-chat"' in q or 'model="smol-batch"' in q or 'tier="' in q, q
    # batch sits at zero: the gateway's queue for its model (only) wakes it
    assert any('model="smol-batch"' in t["metadata"]["query"]
               and t["metadata"].get("activationThreshold") == "0" for t in batch)

    hpa = _render("hpa")
    adapter = yaml.safe_load(_one(hpa, "ConfigMap", "strata-prometheus-adapter")
                             ["data"]["config.yaml"])
    external = [r["name"]["as"] for r in adapter["externalRules"]]
    assert len(external) == len(set(external))  # one rule (and scope) per tier's metric
    assert "strata_waiting_chat" in external
    chat_hpa = _one(hpa, "HorizontalPodAutoscaler", "strata-chat")["spec"]["metrics"]
    names = {m["external"]["metric"]["name"] for m in chat_hpa if m["type"] == "External"}
    assert names and all(n.endswith("_chat") for n in names)
