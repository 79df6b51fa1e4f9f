"""The rendered autoscaling queries, run by a real Prometheus over a real engine and gateway.

``strata deploy render --autoscaler keda|hpa`` writes PromQL that selects the engines and
the gateway by the labels a ServiceMonitor gives their series on Kubernetes
(``namespace``, ``service``, ``pod``). No cluster runs here, so Debian's ``prometheus``
(``scripts/install_prometheus.sh``) scrapes an engine (the tiny model) and a gateway on
loopback through file_sd targets carrying those same labels, and every KEDA query and
every prometheus-adapter rule (its templates filled as the adapter fills them) must
return a number for the tier: a query that selected nothing would leave an HPA blind.
Without the binary the test is skipped, except under ``CI=true`` where it fails.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from strata.deploy.render import render
from tests.engine.test_metrics import serve_engine
from tests.gateway.servers import completion, gateway
from tests.integration.test_prometheus import prometheus  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "cluster.example.yaml"
ENGINE_POD, GATEWAY_POD = "strata-engine-0", "strata-gateway-0"


def _cluster(autoscaling: dict[str, Any]) -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["tiers"]["engine"]["autoscaling"] = autoscaling
    return data


CLUSTERS = [
    _cluster({"policy": "llm", "min_replicas": 0, "max_replicas": 2}),  # KEDA only
    _cluster({"policy": "hpa", "min_replicas": 1, "max_replicas": 4, "metrics": [
        {"name": m, "type": "AverageValue", "average_value": 1} for m in (
            "kv_usage", "running", "waiting", "concurrency", "tokens_per_s")] + [
        {"name": m, "source": "tier", "type": "Value", "value": 1} for m in (
            "pending_requests", "in_flight_requests", "concurrency", "ttft_p90_s",
            "tpot_p90_s")]}),
    _cluster({"policy": "kpa", "metric": "rps", "min_replicas": 1, "max_replicas": 2}),
]


def _queries() -> tuple[list[str], list[tuple[str, str]]]:
    """KEDA's queries, and (scope, query) of each adapter rule with its templates filled."""
    keda: list[str] = []
    adapter: list[tuple[str, str]] = []
    for data in CLUSTERS:
        for obj in render(data, autoscaler="keda"):
            if obj["kind"] == "ScaledObject":
                keda += [t["metadata"]["query"] for t in obj["spec"]["triggers"]]
        if data["tiers"]["engine"]["autoscaling"]["min_replicas"] == 0:
            continue
        for obj in render(data, autoscaler="hpa"):
            if obj["metadata"]["name"] != "strata-prometheus-adapter":
                continue
            config = yaml.safe_load(obj["data"]["config.yaml"])
            for scope, section in (("pods", "rules"), ("external", "externalRules")):
                for rule in config[section]:
                    matchers = 'namespace="strata"' + (
                        f',pod=~"{ENGINE_POD}"' if scope == "pods" else "")
                    adapter.append((scope, rule["metricsQuery"]
                                    .replace("<<.LabelMatchers>>", matchers)
                                    .replace("<<.GroupBy>>", "pod")
                                    .replace("<<.Series>>",
                                             rule["seriesQuery"].split("{")[0])))
    return sorted(set(keda)), sorted(set(adapter))


async def _query(http: httpx.AsyncClient, url: str, promql: str) -> list[dict[str, Any]]:
    body = (await http.get(url + "/api/v1/query", params={"query": promql})).json()
    assert body["status"] == "success", (promql, body)
    return body["data"]["result"]


def _value(result: list[dict[str, Any]]) -> float:
    (sample,) = result
    return float(sample["value"][1])


async def test_rendered_queries_select_the_tier_in_prometheus(
        prometheus: tuple[str, Path], tiny_hf_dir: Path) -> None:  # noqa: F811
    prom_url, targets = prometheus
    keda, adapter = _queries()
    async with serve_engine(tiny_hf_dir, max_num_seqs=4, max_model_len=256) as (
            engine_url, model_name), \
            gateway([engine_url]) as (_, client), \
            httpx.AsyncClient(timeout=10) as http:
        labels = {"namespace": "strata"}
        targets.write_text(json.dumps([
            {"targets": [engine_url.removeprefix("http://")],
             "labels": {**labels, "service": "strata-engine", "pod": ENGINE_POD}},
            {"targets": [str(client.base_url).removeprefix("http://").rstrip("/")],
             "labels": {**labels, "service": "strata-gateway", "pod": GATEWAY_POD}}]))
        deadline = time.monotonic() + 60
        while len(await _query(http, prom_url, "up == 1")) < 2:
            assert time.monotonic() < deadline, "Prometheus never scraped both targets"
            await asyncio.sleep(0.5)
        # Requests over a few scrapes, so the rates and latency quantiles have data.
        for _ in range(6):
            resp = await client.post("/v1/completions", json=completion(
                model=model_name, max_tokens=8, stream=True, ignore_eos=True))
            assert resp.status_code == 200
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.5)
        for promql in keda:
            value = _value(await _query(http, prom_url, promql))
            assert math.isfinite(value) and value >= 0, (promql, value)
        for scope, promql in adapter:
            result = await _query(http, prom_url, promql)
            if scope == "pods":  # one value per pod, as the adapter hands the HPA
                assert [r["metric"].get("pod") for r in result] == [ENGINE_POD], promql
            value = _value(result)
            assert math.isfinite(value) and value >= 0, (promql, value)
        # `or vector(0)` hides a selector that matches nothing: each must match.
        selectors = {m.group(0) for q in keda + [q for _, q in adapter]
                     for m in re.finditer(r"strata_[a-z0-9_]+\{[^}]*\}", q)}
        assert len(selectors) > 10
        for sel in sorted(selectors):
            if sel.startswith("strata_gateway_queue_depth"):
                continue  # no series before a request waits; none waited here
            assert await _query(http, prom_url, sel), f"{sel} selects nothing"
        rps = next(q for q in keda if "strata_requests_total" in q)
        assert _value(await _query(http, prom_url, rps)) > 0  # requests did finish

