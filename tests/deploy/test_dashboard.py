"""The Grafana dashboard names only series that strata's components really export.

Every PromQL expression of the dashboard (for both example cluster files) is cut down to
its metric names by a small tokenizer, and each name is looked up among the families that
the real components register: an engine (the tiny model) and a gateway in front of it, and
a stage replica, all serving /metrics on loopback and read over HTTP; the autoscaler's
series are read from the registry its loop registers them in (``AutoscalerMetrics``, which
``strata serve`` exposes on the gateway's /metrics), in-process. With ``promtool`` on the
machine every expression is also parsed by Prometheus itself.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import torch
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from strata.autoscale.loop import AutoscalerMetrics
from strata.cli import app as cli
from strata.config import ClusterConfig, parse_cluster_config
from strata.deploy.dashboard import dashboard, dashboard_configmap
from strata.stages.runtime import build_runtime
from strata.stages.worker import StageWorker, build_worker_app
from tests.binaries import required_binary
from tests.engine.test_metrics import serve_engine
from tests.gateway.servers import gateway, serve

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [ROOT / "deploy" / "cluster.example.yaml",
            ROOT / "deploy" / "cluster.pipeline.example.yaml"]
# Words of PromQL that are not metric names (functions are dropped by the "(" after them).
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
             "and", "or", "unless"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
             "gauge": ("",), "info": ("_info",), "summary": ("_sum", "_count", "")}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # label values and strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery windows
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.group() in _KEYWORDS or s[m.end():].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def test_the_tokenizer_keeps_names_and_drops_the_rest() -> None:
    expr = ('histogram_quantile(0.9, sum by (le, model) (rate(a_seconds_bucket{x=~"$ns",'
            'y="b{c}"}[$__rate_interval]))) / on (pod) group_left (tier) b_info + 1e-3 '
            '* sum without (le) (c_total offset 5m) and bool d')
    assert metric_names(expr) == {"a_seconds_bucket", "b_info", "c_total", "d"}


def _exprs(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def _config(path: Path) -> ClusterConfig:
    return parse_cluster_config(yaml.safe_load(path.read_text()), str(path))


def _exported(text: str) -> set[str]:
    """Every sample name the families on a /metrics page can have."""
    out = set()
    for f in text_string_to_metric_families(text):
        out.update(f.name + suffix for suffix in _SUFFIXES[f.type])
    return out


def _component(name: str) -> str:
    for prefix, component in (("strata_gateway_", "gateway"), ("strata_tier_", "gateway"),
                              ("strata_autoscaler_", "autoscaler"), ("strata_stage_", "stage")):
        if name.startswith(prefix):
            return component
    return "engine"


async def _pages(model: Path) -> dict[str, set[str]]:
    """What a real engine, gateway and stage replica serve on /metrics, and the autoscaler's."""
    pages: dict[str, set[str]] = {}
    async with serve_engine(model) as (url, served), gateway([url]) as (_, client):
        body = {"model": served, "prompt": "Dashboards as code", "max_tokens": 3,
                "stream": True, "temperature": 0}
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for _ in resp.aiter_bytes():
                pass
        pages["gateway"] = _exported((await client.get("/metrics")).text)
        pages["engine"] = _exported((await client.get(url + "/metrics")).text)
    rt = build_runtime(model, "1:2", torch.float32, torch.device("cpu"), 1 << 24)
    worker = StageWorker(rt, "tiny", "127.0.0.1", 0, "")
    await worker.start()
    try:
        async with serve(build_worker_app(worker), lifespan="off") as url, \
                httpx.AsyncClient(timeout=30) as http:
            pages["stage"] = _exported((await http.get(url + "/metrics")).text)
    finally:
        await worker.stop()
    registry = CollectorRegistry()
    AutoscalerMetrics(registry)
    pages["autoscaler"] = _exported(generate_latest(registry).decode())
    return pages


async def test_every_metric_the_dashboard_names_is_exported(tiny_hf_dir: Path) -> None:
    pages = await _pages(tiny_hf_dir)
    used: set[str] = set()
    for path in EXAMPLES:
        for expr in _exprs(dashboard(_config(path))):
            names = metric_names(expr)
            assert names, expr
            used |= names
    missing = {n: _component(n) for n in used if n not in pages[_component(n)]}
    assert not missing, missing
    # Every component is drawn, latency histograms through their buckets.
    assert {_component(n) for n in used} == {"engine", "gateway", "autoscaler", "stage"}
    assert {"strata_time_to_first_token_seconds_bucket", "strata_gateway_ttft_seconds_bucket",
            "strata_autoscaler_desired_replicas", "strata_stage_busy_ratio",
            "strata_gateway_rejected_total"} <= used


def test_stage_panels_only_for_a_pipeline_and_slos_as_thresholds() -> None:
    plain, pipeline = (dashboard(_config(p)) for p in EXAMPLES)
    assert not any("strata_stage_" in e for e in _exprs(plain))
    assert any("strata_stage_busy_ratio" in e for e in _exprs(pipeline))
    config = _config(EXAMPLES[0])
    ttft = next(p for p in plain["panels"] if p["title"] == "Time to first token (engines)")
    steps = ttft["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == config.slos.ttft_s
    q = f"{config.slos.percentile / 100:g}"
    assert any(t["expr"].startswith(f"histogram_quantile({q},") for t in ttft["targets"])
    ids = [p["id"] for p in pipeline["panels"]]
    assert len(ids) == len(set(ids))
    for p in pipeline["panels"]:  # no two panels overlap on the grid
        g = p["gridPos"]
        for o in pipeline["panels"]:
            h = o["gridPos"]
            if o is not p:
                assert (g["x"] + g["w"] <= h["x"] or h["x"] + h["w"] <= g["x"]
                        or g["y"] + g["h"] <= h["y"] or h["y"] + h["h"] <= g["y"]), (p, o)


def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    promtool = required_binary("promtool")
    exprs = _exprs(dashboard(_config(EXAMPLES[1])))
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"strata:dashboard:{i}",
         "expr": e.replace("$__rate_interval", "1m").replace("$namespace", ".*")}
        for i, e in enumerate(exprs)]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(exprs)} rules found" in done.stdout


def test_configmap_for_grafana_sidecar_and_the_cli_prints_the_json() -> None:
    config = _config(EXAMPLES[0])
    cm = dashboard_configmap(config, "llm")
    kubernetes_validate.validate(cm, "1.31.0", strict=True)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(cm["data"]["strata.json"])
    ns = next(v for v in board["templating"]["list"] if v["name"] == "namespace")
    assert ns["current"]["value"] == "llm"
    result = CliRunner().invoke(cli, ["deploy", "dashboard", "-f", str(EXAMPLES[0])])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == dashboard(config)
    bad = CliRunner().invoke(cli, ["deploy", "dashboard", "-f", str(ROOT / "no-such.yaml")])
    assert bad.exit_code == 2
