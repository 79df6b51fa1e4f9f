"""``strata simulate`` over a cluster file with two models (strata.sim.tiers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from strata.bench.traces import Trace, TraceRecord
from strata.config import parse_cluster_config
from strata.sim.cli import app
from strata.sim.tiers import model_shares, split_trace
from tests.sim.test_cli import write_trace

TWO_MODELS = """
engine: {max_num_batched_tokens: 1024}
tiers:
  chat:
    model: {served_model_name: chat}
    replicas: 2
  batch:
    model: {served_model_name: batch}
    engine: {max_num_batched_tokens: 1024, max_num_seqs: 4}
    replicas: 0
    autoscaling: {policy: kpa, min_replicas: 0, max_replicas: 2}
routing: {policy: least_requests}
gateway: {hold_timeout_s: 300}  # an A100 replica of llama-2-13b takes 93 s to start
"""


def test_each_request_goes_to_one_model_by_seeded_shares() -> None:
    cfg = parse_cluster_config({"tiers": {"a": {"model": {"served_model_name": "x"}},
                                          "b": {"model": {"served_model_name": "y"}}}})
    assert model_shares(cfg, []) == {"x": 1.0, "y": 1.0}
    assert model_shares(cfg, ["y=2"]) == {"x": 0.0, "y": 2.0}
    for bad in (["z=1"], ["x"], ["x=-1"], ["x=0"]):
        with pytest.raises(ValueError, match="--model-share"):
            model_shares(cfg, bad)
    trace = Trace("t", tuple(TraceRecord(i * 0.1, 10, 5, line=i) for i in range(400)))
    parts = split_trace(trace, {"x": 3.0, "y": 1.0}, seed=7)
    assert sorted(r.line for p in parts.values() for r in p.records) == list(range(400))
    assert 240 < len(parts["x"].records) < 360  # about three quarters
    assert parts == split_trace(trace, {"x": 3.0, "y": 1.0}, seed=7)  # deterministic
    assert split_trace(trace, {"x": 1.0, "y": 0.0}, seed=7)["y"].records == ()


def test_simulate_a_two_model_cluster_file(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(TWO_MODELS)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["-f", str(cluster), "--trace", str(trace), "--output",
                                   str(out), "--save-requests", "--model-share", "chat=3",
                                   "--model-share", "batch=1"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    chat, batch = doc["tiers"]["chat"], doc["tiers"]["batch"]
    assert doc["config"]["tiers"] == {"chat": "chat", "batch": "batch"}
    assert chat["summary"]["requests"] + batch["summary"]["requests"] == 40
    assert batch["summary"]["requests"] > 0
    assert doc["summary"]["completed"] == 40  # the batch tier was woken from zero
    assert {r["replica"] for r in chat["requests"]} == {"u0", "u1"}
    assert batch["config"]["initial_units"] == 0 and batch["config"]["engine"]["max_num_seqs"] == 4
    assert chat["config"]["engine"]["max_num_seqs"] == 64 and chat["config"]["autoscaling"] is None
    assert any(d["current"] == 0 and d["desired"] >= 1 for d in batch["decisions"])
    assert "tier chat (model chat)" in res.output and "tier batch (model batch)" in res.output


def test_model_share_needs_several_tiers(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv", 3)
    res = CliRunner().invoke(app, ["--trace", str(trace), "--model-share", "x=1"])
    assert res.exit_code == 2 and "several tiers" in res.output
