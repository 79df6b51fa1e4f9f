"""End to end: `strata bench` mounted under a root Typer, against fake backend processes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from strata.bench.cli import app as bench_app


def _root() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(bench_app, name="bench")

    @root.command()
    def version() -> None:  # a sibling command, so "bench" is a real sub-group
        typer.echo("0")

    return root


@pytest.mark.slow
def test_open_loop_mooncake_then_closed_loop_and_compare(
        fake_backend: Callable[..., str], tmp_path: Path) -> None:
    runner = CliRunner()
    url = fake_backend("--ttft-ms", "10", "--itl-ms", "2", "--output-tokens", "4")
    a = tmp_path / "a.json"
    res = runner.invoke(_root(), [
        "bench", "--target", url, "--trace", "mooncake", "--time-scale", "0.01",
        "--max-requests", "30", "--scrape-interval-s", "0.2", "--output", str(a)])
    assert res.exit_code == 0, res.output
    data = json.loads(a.read_text())
    assert data["config"]["length_factor"] == 0.0625 and data["config"]["block_tokens"] == 32
    assert data["config"]["mode"] == "open-loop" and data["summary"]["completed"] == 30
    reqs = data["requests"]
    assert all(r["output_tokens"] == r["max_tokens"] for r in reqs)  # ignore_eos honoured
    assert all(r["server_prompt_tokens"] == r["prompt_tokens"] for r in reqs)
    assert data["timeseries"]['strata_tier_replicas{tier="engine"}'][0]["value"] == 1.0
    assert (tmp_path / "a_cdf.png").stat().st_size > 10_000
    assert (tmp_path / "a_timeline.png").stat().st_size > 10_000
    assert "goodput" in res.output and "throughput" in res.output

    # Closed loop against a server that does not know ignore_eos: the summary says so.
    plain = fake_backend("--ttft-ms", "5", "--itl-ms", "1", "--output-tokens", "3",
                         "--no-ignore-eos")
    b = tmp_path / "b.json"
    res = runner.invoke(_root(), [
        "bench", "--target", plain + "/v1", "--trace", "synthetic", "--rate", "100",
        "--max-requests", "20", "--concurrency", "4", "--input-tokens", "40",
        "--output-tokens", "16", "--api", "chat", "--no-plots", "--output", str(b)])
    assert res.exit_code == 0, res.output
    summary = json.loads(b.read_text())["summary"]
    assert summary["completed"] == 20 and summary["ignore_eos_ignored"] == 20
    assert "ignored ignore_eos" in res.output

    res = runner.invoke(_root(), ["bench", "compare", str(a), str(b)])
    assert res.exit_code == 0, res.output
    assert "B/A" in res.output and "ttft p50 (ms)" in res.output and "x" in res.output


def test_cli_errors_name_the_fix(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,0,4\n")
    res = runner.invoke(_root(), ["bench", "--target", "http://127.0.0.1:9", "--trace",
                                  str(bad), "--output", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "line 2" in res.output and "--on-bad-rows" in res.output
    res = runner.invoke(_root(), ["bench", "--trace", "synthetic"])
    assert res.exit_code == 2 and "--target" in res.output
    res = runner.invoke(_root(), ["bench", "--target", "http://127.0.0.1:9", "--rate", "1",
                                  "--max-requests", "1", "--output", str(tmp_path / "y.json")])
    assert res.exit_code == 2 and "--model" in res.output
