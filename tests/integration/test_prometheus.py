"""The autoscaler reading its metrics from a real Prometheus server over its HTTP API.

Debian's ``prometheus`` (``scripts/install_prometheus.sh``) runs on loopback with a 1 s
scrape interval; it discovers the gateway and the engines from the file_sd targets file the
cluster keeps current. The tier scales on ``arrival_rate_rps`` (``rate()`` of the gateway's
arrivals counter, computed by Prometheus) plus a ``custom_*`` PromQL metric. Without the
binary the test is skipped, except under ``CI=true`` where it fails.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from strata.platform.process import free_port
from tests.binaries import required_binary
from tests.integration.cluster_helpers import complete, start_cluster, stop_cluster, tier, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Prometheus server on loopback scraping the targets in the yielded file."""
    binary = required_binary("prometheus")
    targets = tmp_path / "targets.json"
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s, scrape_timeout: 1s}}
scrape_configs:
  - job_name: strata
    file_sd_configs: [{{files: ["{targets}"], refresh_interval: 1s}}]
""")
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url, proc), 60, "Prometheus to be ready")
        yield url, targets
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(url: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, "prometheus exited"
    try:
        return httpx.get(url + "/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, promql: str) -> list[dict[str, Any]]:
    body = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_autoscaler_scales_on_metrics_read_through_prometheus(
        prometheus: tuple[str, Path], tiny_hf_dir: Path, tmp_path: Path) -> None:
    prom_url, targets = prometheus
    config = {
        "model": {"path": str(tiny_hf_dir), "served_model_name": "tiny"},
        "engine": {"dtype": "float32", "kv_cache": "16MiB", "threads": 1},
        "tiers": {"engine": {
            "replicas": 1,
            "autoscaling": {"policy": "hpa", "min_replicas": 1, "max_replicas": 2, "metrics": [
                {"name": "arrival_rate_rps", "source": "tier", "type": "AverageValue",
                 "average_value": 0.5},
                {"name": "custom_held", "source": "tier", "type": "Value", "value": 50}]},
            "custom_metrics": {"custom_held": 'sum(strata_gateway_queue_depth{tier="$tier"})'
                               " or vector(0)"}}},
        # history: the scale-up decision must still be kept when the second replica is
        # ready; the default 50 decisions are 50 s at period 1 s, which a replica start on a
        # loaded 2-core machine has exceeded.
        "autoscaler": {"period_s": 1, "window_s": 10, "history": 1000},
        "gateway": {"port": free_port()},
        "platform": {"log_dir": str(tmp_path / "replicas"), "health_interval_s": 0.2},
        "prometheus": {"url": prom_url, "targets_file": str(targets)},
    }
    proc, url = start_cluster(config, tmp_path)
    try:
        wait_for(lambda: tier(url)["ready"] == 1, 120, "the first replica")
        wait_for(lambda: len(query(prom_url, 'up{tier="engine"} == 1')) == 2, 30,
                 "Prometheus to scrape the gateway and the engine")

        stop = threading.Event()
        codes: list[int] = []

        def client() -> None:  # about 2 requests/s, open loop
            while not stop.is_set():
                threading.Thread(target=lambda: codes.append(complete(url).status_code)).start()
                time.sleep(0.5)

        sender = threading.Thread(target=client)
        sender.start()
        try:
            wait_for(lambda: tier(url)["ready"] == 2, 120, "scale-up to two ready replicas")
        finally:
            stop.set()
            sender.join()
        wait_for(lambda: len(codes) > 0, 30, "answers")

        decisions = httpx.get(url + "/admin/status", timeout=5).json()["decisions"]
        up = [d for d in decisions if d["desired"] == 2 and d["current"] == 1]
        assert up and all(d["source"] == "prometheus" for d in up), decisions[-3:]
        assert up[0]["metrics"]["arrival_rate_rps"] > 0.5 * 1.1  # above target + tolerance
        assert up[0]["metrics"]["custom_held"] >= 0  # the custom PromQL query was evaluated
        assert "arrival_rate_rps above target" in up[0]["reason"]

        # Prometheus found the new engine through the targets file, and scrapes the
        # autoscaler's own gauges from the gateway.
        wait_for(lambda: len(query(prom_url, 'up{tier="engine",role="engine"} == 1')) == 2,
                 30, "both engines scraped")
        wait_for(lambda: [r["value"][1] for r in query(
            prom_url, 'strata_autoscaler_desired_replicas{tier="engine",policy="hpa"}')] == ["2"],
                 30, "the desired-replicas gauge in Prometheus")
        assert query(prom_url, 'strata_generation_tokens_total{tier="engine"}')
        assert all(c == 200 for c in codes), codes
    finally:
        assert stop_cluster(proc) == 0
