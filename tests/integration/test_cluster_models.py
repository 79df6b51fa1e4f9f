"""Several models in one ``strata serve`` cluster: two tiers, routed by the request's model.

The bundled model is served under two names by two tiers with different engine options:
``always`` runs one replica, ``lazy`` starts at zero (``min_replicas: 0``). Requests go to
the tier of their model, /v1/models lists both, an unknown model is vLLM's 404, and a
request for ``lazy`` wakes that tier only while ``always`` keeps answering meanwhile.
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
from tests.integration.cluster_helpers import (
    complete,
    start_cluster,
    status,
    stop_cluster,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(bundled_gguf: Path, tmp_path: Path) -> Iterator[str]:
    config = {
        "model": {"path": str(bundled_gguf)},
        "engine": {"dtype": "float32", "kv_cache": "16MiB", "threads": 1, "max_num_seqs": 8},
        "tiers": {
            "always": {"model": {"path": str(bundled_gguf), "served_model_name": "smol-a"},
                       "replicas": 1},
            "lazy": {"model": {"path": str(bundled_gguf), "served_model_name": "smol-b"},
                     "engine": {"dtype": "float32", "kv_cache": "8MiB", "threads": 1,
                                "max_num_seqs": 2},
                     "replicas": 0,
                     "autoscaling": {"policy": "llm", "min_replicas": 0, "max_replicas": 1,
                                     "scale_to_zero_grace_s": 3600}},
        },
        "autoscaler": {"period_s": 1, "window_s": 10},
        "gateway": {"port": free_port(), "hold_timeout_s": 300},
        "platform": {"log_dir": str(tmp_path / "replicas"), "health_interval_s": 0.2},
    }
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc, url = start_cluster(config, tmp_path)
        yield url
        assert stop_cluster(proc) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        print((tmp_path / "cluster.log").read_text()[-5000:])


def tiers(url: str) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in status(url)["tiers"]}


def test_two_models_route_by_name_and_scale_apart(cluster: str) -> None:
    url = cluster
    listed = httpx.get(url + "/v1/models", timeout=5).json()["data"]
    assert {m["id"] for m in listed} == {"smol-a", "smol-b"}  # lazy is listed at zero too
    assert tiers(url)["lazy"]["desired"] == 0

    missing = complete(url, model="gpt-9")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "The model `gpt-9` does not exist."
    assert missing.json()["error"]["param"] == "model"

    wait_for(lambda: tiers(url)["always"]["ready"] == 1, 300, "the always-on tier")
    a = complete(url, model="smol-a")
    assert a.status_code == 200, a.text
    assert a.json()["model"] == "smol-a"
    [a_replica] = tiers(url)["always"]["replicas"]
    assert a.headers["x-strata-replica"] == a_replica["url"]
    assert tiers(url)["lazy"]["desired"] == 0  # nothing woke the other tier

    # A request for the tier at zero is held while that tier (only) starts a replica; the
    # other model keeps answering meanwhile.
    woken: list[httpx.Response] = []
    body = {"model": "smol-b", "prompt": "Hello there", "max_tokens": 16, "temperature": 0}
    waker = threading.Thread(target=lambda: woken.append(
        httpx.post(url + "/v1/completions", json=body, timeout=360)))
    t0 = time.monotonic()
    waker.start()
    wait_for(lambda: tiers(url)["lazy"]["desired"] == 1, 30, "the lazy tier's activation")
    assert any(d["tier"] == "lazy" and d["source"] == "activator"
               for d in status(url)["decisions"])
    during = complete(url, model="smol-a")
    assert during.status_code == 200 and not woken  # served while smol-b is still held
    waker.join(300)
    assert time.monotonic() - t0 < 300
    [b] = woken
    assert b.status_code == 200, b.text
    assert b.json()["model"] == "smol-b"
    now = tiers(url)
    [b_replica] = now["lazy"]["replicas"]
    assert b.headers["x-strata-replica"] == b_replica["url"] != a_replica["url"]
    assert now["always"]["desired"] == 1 and [r["id"] for r in now["always"]["replicas"]] \
        == [a_replica["id"]]
    assert not any(d["tier"] == "always" for d in status(url)["decisions"])  # fixed

    # Both tiers' series are labelled apart: arrivals per tier, TTFT per model.
    metrics = httpx.get(url + "/metrics", timeout=5).text
    assert 'strata_cluster_requests_received_total{tier="lazy"} 1.0' in metrics
    assert 'strata_cluster_requests_received_total{tier="always"} 2.0' in metrics
    assert 'strata_gateway_ttft_seconds_count{model="smol-b"} 1.0' in metrics
