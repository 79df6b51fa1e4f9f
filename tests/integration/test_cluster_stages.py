"""A cluster file with a 2-stage pipeline, run by the cluster on real processes.

First `serve_cluster` runs the file as `strata serve -f` does (a child process, Ctrl-C at
the end, no process left behind). Then the cluster (gateway, LocalPlatform, autoscaler) runs in this process on its own event
loop thread, so the test can call the very methods the control loop calls: one
``autoscaler.tick()`` scales the busy stage up through the real decision path, and
``platform.scale`` takes it back down while sequences are pinned to the leaving replica.
Outputs are compared with a single real engine's greedy ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import io
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from rich.console import Console

from strata.cluster import Cluster, print_status
from strata.cluster_status import render_status
from strata.config import load_cluster_config
from tests.integration.cluster_helpers import alive, start_cluster, status, stop_cluster, wait_for
from tests.integration.conftest import free_port

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
STAGE = "stage-15-30"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three fruits:",
           "Once upon a time,"]


def _config(tmp: Path, port: int) -> dict[str, Any]:
    return {
        "engine": {"threads": 1, "dtype": "float32", "num_kv_blocks": 128, "max_model_len": 512},
        "tiers": {"pipeline": {
            "stages": [{"layers": "0:15"}, {"layers": "15:30", "max_replicas": 2}],
            # Any work at all is "over target", so one tick after a request scales up.
            "stage_scaling": {"target_busy_pct": 1, "downscale_stabilization_s": 0},
        }},
        "autoscaler": {"period_s": 3600},  # ticks only when the test calls tick()
        "gateway": {"port": port},
        "platform": {"log_dir": str(tmp / "logs"), "health_interval_s": 0.25,
                     "drain_timeout_s": 90},
    }


def test_serve_cluster_runs_the_pipeline_file(tmp_path: Path, engine_url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    proc, url = start_cluster(_config(tmp_path, free_port()), tmp_path)
    try:
        wait_for(lambda: [t["ready"] for t in status(url)["tiers"]] == [1, 1], 300,
                 "the head and its stage ready")
        assert _complete(url, PROMPTS[0]) == _complete(engine_url, PROMPTS[0])
        pids = [r["pid"] for t in status(url)["tiers"] for r in t["replicas"]]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        assert print_status(url) == 0
        shown = capsys.readouterr().out
        assert "stage-15-30" in shown and "stage-head" in shown and "15:30" in shown
    finally:
        code = stop_cluster(proc)
    assert code == 0, (tmp_path / "cluster.log").read_text()[-3000:]
    assert not any(alive(p) for p in pids)


class _Running:
    """A Cluster served on a private event loop thread."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.loop = asyncio.new_event_loop()
        self.stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.stop = asyncio.Event()
            try:
                self.loop.run_until_complete(cluster.run(self.stop, lambda _: started.set()))
            except BaseException as e:  # noqa: BLE001 - reported by the test
                self.error = e
                started.set()

        self.thread = threading.Thread(target=run, name="cluster", daemon=True)
        self.thread.start()
        assert started.wait(60), "the cluster did not start"
        assert self.error is None, self.error

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)
        assert not self.thread.is_alive(), "the cluster did not stop"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Running]:
    tmp = tmp_path_factory.mktemp("stage-cluster")
    config = _config(tmp, 0)
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    r = _Running(Cluster(load_cluster_config(path)))
    try:
        wait_for(lambda: bool(r.cluster.platform.endpoints("pipeline")), 300,
                 "the pipeline head to be ready (its stage joined)")
        yield r
    finally:
        r.close()
    assert not any(r.cluster.platform.replicas(t) for t in ("pipeline", STAGE))


def _complete(url: str, prompt: str, max_tokens: int = 12) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=180)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def _stage_replicas(r: _Running) -> list[dict[str, Any]]:
    head = r.cluster.platform.endpoints("pipeline")[0].url
    view = httpx.get(head + "/stages", timeout=10).json()
    (stage,) = [s for s in view["stages"] if s["layers"] == "15:30"]
    return stage["replicas"]


def test_gateway_request_equals_the_single_engine(running: _Running, engine_url: str) -> None:
    url = running.cluster.url
    for prompt in PROMPTS[:2]:
        assert _complete(url, prompt) == _complete(engine_url, prompt)
    payload = running.cluster._status()
    kinds = {t["name"]: (t["kind"], t["layers"], t["ready"]) for t in payload["tiers"]}
    assert kinds == {"pipeline": ("stage-head", "0:15", 1), STAGE: ("stage", "15:30", 1)}
    wait_for(lambda: running.cluster._status()["tiers"][1]["replicas"][0]["head_state"]
             == "live", 10, "the status to show the stage replica joined")
    out = io.StringIO()
    render_status(running.cluster._status(), Console(file=out, width=160))
    assert "Replicas of stage tier stage-15-30 (layers 15:30)" in out.getvalue()


def test_autoscaler_grows_the_busy_stage_and_new_sequences_use_it(running: _Running) -> None:
    c = running.cluster
    _complete(c.url, PROMPTS[0], max_tokens=8)  # recent work: busy ratio above 1 %
    decisions = running.call(c.autoscaler.tick())
    (d,) = [d for d in decisions if d.tier == STAGE]
    assert (d.current, d.desired) == (1, 2), d
    assert d.metrics and any("custom_stage_busy" in k for k in d.metrics), d.metrics
    wait_for(lambda: len([x for x in _stage_replicas(running) if x["state"] == "live"]) == 2,
             300, "the second 15:30 replica to join the head")
    before = {x["url"]: x["steps"] for x in _stage_replicas(running)}
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        list(ex.map(lambda p: _complete(c.url, p, max_tokens=8), PROMPTS))
    after = {x["url"]: x["steps"] for x in _stage_replicas(running)}
    assert all(after[u] > before[u] for u in before), (before, after)  # both took sequences


def test_scale_down_drains_pinned_sequences_without_failing_them(
        running: _Running, engine_url: str) -> None:
    c = running.cluster
    if len(c.platform.endpoints(STAGE)) < 2:
        pytest.skip("needs the scale-up of the previous test")
    expected = {p: _complete(engine_url, p, max_tokens=32) for p in PROMPTS}
    victim = max(c.platform.replicas(STAGE), key=lambda x: x.ready_at or 0.0)  # newest goes
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        futures = {p: ex.submit(_complete, c.url, p, 32) for p in PROMPTS}
        wait_for(lambda: any(x["url"] == victim.url and x["pinned"] > 0
                             for x in _stage_replicas(running)), 60,
                 "a sequence pinned to the replica that will leave")
        running.call(c.platform.scale(STAGE, 1))
        wait_for(lambda: any(r.phase == "draining" for r in c.platform.replicas(STAGE)), 10,
                 "the leaving replica to drain")
        got = {p: f.result(timeout=240) for p, f in futures.items()}
    assert got == expected
    wait_for(lambda: [r.replica_id for r in c.platform.replicas(STAGE)]
             != [victim.replica_id] and len(c.platform.replicas(STAGE)) == 1, 120,
             "the drained replica to stop")
    assert victim.replica_id not in {r.replica_id for r in c.platform.replicas(STAGE)}
    wait_for(lambda: [x["url"] for x in _stage_replicas(running)] != [victim.url]
             and len(_stage_replicas(running)) == 1, 30, "the head to forget it")
    assert _complete(c.url, PROMPTS[0], max_tokens=32) == expected[PROMPTS[0]]
