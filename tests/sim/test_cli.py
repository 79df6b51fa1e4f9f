"""``strata simulate`` end to end on a small trace file (no processes, no network)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from strata.sim.cli import app
from tests.sim.test_cpu_profile import profile


def write_trace(path: Path, n: int = 40) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(n):
        lines.append(f"2023-11-16 18:15:{i // 2:02d}.{(i % 2) * 5}000000,{200 + 13 * i},{20 + i}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_simulate_a100_with_a_cluster_file(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("engine:\n  max_num_batched_tokens: 1024\ntiers:\n  engine:\n"
                       "    replicas: 2\nrouting:\n  policy: least_requests\n")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["-f", str(cluster), "--trace", str(trace), "--output",
                                   str(out), "--save-requests"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["summary"]["completed"] == 40
    assert doc["config"]["routing"]["policy"] == "least_requests"
    assert {r["replica"] for r in doc["requests"]} == {"u0", "u1"}
    assert "TTFT" in res.output


def test_simulate_cpu_local_from_a_profile(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv", 10)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["--trace", str(trace), "--hardware", "cpu-local", "--model",
                                   "smollm2-135m", "--profile", str(profile(tmp_path)),
                                   "--output", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["config"]["hardware"] == "cpu-local" and doc["summary"]["completed"] == 10


def test_bad_options_exit_2_with_the_reason(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv", 3)
    res = CliRunner().invoke(app, ["--trace", str(trace), "--hardware", "tpu-v9"])
    assert res.exit_code == 2 and "--hardware" in res.output
