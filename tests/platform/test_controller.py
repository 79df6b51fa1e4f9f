"""``strata controller`` serves its autoscaler series on /metrics (against the fake API server).

The Kubernetes API is ``tests/platform/fake_kube_api.py``, the one mock allowed in the suite;
the pods it runs are real replica processes, and /metrics is read over real HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from strata.config import ClusterConfig
from strata.platform.controller import run_controller
from strata.platform.process import free_port
from tests.platform.fake_kube_api import FakeKubeApi
from tests.platform.test_kubernetes import DEPLOYMENT, start_replica


@pytest.fixture
def kube() -> Iterator[FakeKubeApi]:
    api = FakeKubeApi(start_replica).start()
    api.add_deployment(DEPLOYMENT, replicas=1, requests={"cpu": "1"})
    try:
        yield api
    finally:
        api.stop()


def _desired(text: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "strata_autoscaler_desired_replicas" and s.labels["tier"] == "engine":
                return s.value
    return None


async def test_the_controller_serves_its_decisions_on_metrics(kube: FakeKubeApi) -> None:
    config = ClusterConfig.model_validate({
        "platform": {"kind": "kubernetes", "api_server": kube.url, "api_timeout_s": 2},
        "autoscaler": {"period_s": 1},
        "tiers": {"engine": {"replicas": 1, "autoscaling": {
            "policy": "hpa", "min_replicas": 2, "max_replicas": 3}}},
    })
    port = free_port()
    stop = asyncio.Event()
    run = asyncio.create_task(run_controller(config, stop, metrics_port=port,
                                             metrics_host="127.0.0.1"))
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + 60
            text = ""
            while time.monotonic() < deadline:
                assert not run.done(), run
                try:
                    text = (await http.get(url)).text
                except httpx.ConnectError:
                    text = ""
                if _desired(text) == 2 and kube.spec_replicas(DEPLOYMENT) == 2:
                    break
                await asyncio.sleep(0.2)
            assert _desired(text) == 2, text  # below min_replicas: brought up at once
            assert 'strata_autoscaler_scale_events_total{direction="up",policy="hpa",' \
                   'tier="engine"} 1.0' in text
            assert kube.spec_replicas(DEPLOYMENT) == 2
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
    with pytest.raises(httpx.ConnectError):  # the exporter stops with the loop
        httpx.get(url, timeout=2)
