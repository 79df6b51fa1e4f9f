"""``strata serve`` end to end: real engine processes behind the gateway, scaled by the loop.

One cluster process (a tiny random-weight Llama, so a replica starts in seconds) goes
through: scale from zero on the first request, scale up under load, scale down with a
request still streaming on the drained replica, a replica killed and restarted, ``strata
status``, and Ctrl-C leaving no process behind. A second cluster whose model cannot load
shows the activator's bounded wait ending in a clear 503.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from strata.cluster import print_status
from strata.platform.process import free_port
from tests.integration.cluster_helpers import (
    alive,
    complete,
    start_cluster,
    status,
    stop_cluster,
    tier,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tiny_hf_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    config = {
        "model": {"path": str(tiny_hf_dir), "served_model_name": "tiny"},
        "engine": {"dtype": "float32", "kv_cache": "16MiB", "threads": 1, "max_num_seqs": 8},
        "tiers": {"engine": {"replicas": 0, "autoscaling": {
            "policy": "hpa", "min_replicas": 0, "max_replicas": 2,
            "metrics": [{"name": "concurrency", "source": "tier", "type": "AverageValue",
                         "average_value": 1}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 5}},
            "scale_to_zero_grace_s": 3600}}},
        "autoscaler": {"period_s": 1, "window_s": 10},
        "gateway": {"port": free_port(), "hold_timeout_s": 120},
        "platform": {"log_dir": str(tmp_path / "replicas"), "restart_backoff_s": 0.5,
                     "health_interval_s": 0.2, "drain_timeout_s": 120},
    }
    proc, url = start_cluster(config, tmp_path)
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        print((tmp_path / "cluster.log").read_text()[-5000:])


def test_cluster_lifecycle(cluster: tuple[subprocess.Popen, str],
                           capsys: pytest.CaptureFixture[str]) -> None:
    proc, url = cluster
    assert tier(url)["desired"] == 0 and tier(url)["replicas"] == []

    # Scale from zero: the request is held while the activator starts a replica.
    first = complete(url)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["completion_tokens"] == 16
    decisions = status(url)["decisions"]
    assert any(d["source"] == "activator" and (d["current"], d["desired"]) == (0, 1)
               for d in decisions)

    # Scale up: four clients in a closed loop until a second replica is ready and used.
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def client() -> None:
        while not stop.is_set():
            r = complete(url, max_tokens=64)
            results.append((r.status_code, r.headers.get("x-strata-replica", "")))

    workers = [threading.Thread(target=client) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: tier(url)["ready"] == 2, 150, "a second ready replica")
        n = len(results)
        wait_for(lambda: len({rep for _, rep in results[n:]}) == 2, 60, "traffic on both")
        # Scale down drains: a long stream on the newest replica (the one removed) must
        # finish. It starts while the clients still keep the tier at 2, so the scale-down
        # cannot come before it.
        replicas = tier(url)["replicas"]
        victim = min(replicas, key=lambda r: r["ready_for_s"])
        keeper = max(replicas, key=lambda r: r["ready_for_s"])
        chunks: list[str] = []
        with httpx.stream("POST", victim["url"] + "/v1/completions", timeout=180, json={
                "model": "tiny", "prompt": "Hi", "max_tokens": 1500, "ignore_eos": True,
                "stream": True}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(line)
                    if len(chunks) == 2:  # now idle the clients: the tier goes 2 -> 1
                        stop.set()
                        for w in workers:
                            w.join(120)
                        wait_for(lambda: tier(url)["desired"] == 1, 30, "the scale-down decision")
                        states = {r["id"]: r["phase"] for r in tier(url)["replicas"]}
                        # The tiny model may have generated all 1500 tokens already (the
                        # client has read 2): then the drain ends at once and the replica is
                        # stopping, and its SIGTERM drain must still deliver the whole stream.
                        assert states[victim["id"]] in ("draining", "stopping"), states
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    assert results and all(code == 200 for code, _ in results)
    assert any(d["source"] == "metrics" and d["desired"] == 2 for d in status(url)["decisions"])

    assert json.loads(chunks[-1][6:])["choices"][0]["finish_reason"] == "length"
    assert len(chunks) >= 1500 // 2  # the whole answer came through
    wait_for(lambda: [r["id"] for r in tier(url)["replicas"]] == [keeper["id"]], 30,
             "the drained replica to exit")
    assert not alive(victim["pid"])

    # A replica killed outright is restarted; a request meanwhile waits and succeeds.
    os.kill(keeper["pid"], signal.SIGKILL)
    wait_for(lambda: tier(url)["replicas"][0]["phase"] != "ready", 10, "the crash noticed")
    time.sleep(1.0)  # the endpoint feed takes the dead replica out of the gateway
    during = complete(url)
    assert during.status_code == 200, during.text
    [again] = tier(url)["replicas"]
    assert again["id"] == keeper["id"] and again["restarts"] == 1
    assert again["pid"] != keeper["pid"] and "status -9" in again["last_exit"]

    assert print_status(url) == 0
    out = capsys.readouterr().out
    assert "Replicas of tier engine" in out and keeper["id"] in out
    assert "Last scaling decisions" in out and "hpa (metrics)" in out

    # Ctrl-C: everything stops, nothing is left behind.
    assert stop_cluster(proc) == 0
    assert not alive(again["pid"])
    assert print_status(url) == 1


def test_activation_of_a_broken_tier_ends_in_a_clear_503(tmp_path: Path) -> None:
    config = {
        "model": {"path": str(tmp_path / "no-such-model.gguf")},
        "engine": {"threads": 1, "kv_cache": "16MiB"},
        "tiers": {"engine": {"replicas": 0, "autoscaling": {
            "policy": "llm", "min_replicas": 0, "max_replicas": 1}}},
        "autoscaler": {"period_s": 5},
        "gateway": {"port": free_port(), "hold_timeout_s": 120},
        "platform": {"log_dir": str(tmp_path / "replicas"), "restart_backoff_s": 0.2,
                     "restart_backoff_max_s": 0.5},
    }
    proc, url = start_cluster(config, tmp_path)
    try:
        t0 = time.monotonic()
        # the served name is the model file's stem; another name is a 404 at once
        r = complete(url, model="no-such-model")
        elapsed = time.monotonic() - t0
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "activation_failed"
        assert "engine-0 keeps crashing (3 times in a row, last: exited with status 1)" \
            in error["message"]
        assert elapsed < 110  # before the hold timeout: a crash loop fails fast
        assert r.headers.get("retry-after")
    finally:
        assert stop_cluster(proc) == 0
