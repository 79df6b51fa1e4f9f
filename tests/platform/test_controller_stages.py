"""``strata controller`` scaling a stage pipeline on Kubernetes (against the fake API server).

The Kubernetes API is ``tests/platform/fake_kube_api.py``, the one mock allowed in the
suite; its pods are real processes (``tests/integration/fake_replica.py``) whose /load
reports a stage replica's busy ratio, read over real HTTP by the controller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from strata.config import ClusterConfig
from strata.platform.controller import run_controller
from strata.platform.kubernetes import KubernetesPlatform
from tests.platform.fake_kube_api import FakeKubeApi
from tests.platform.test_kubernetes import start_replica

HEAD, STAGE = "strata-pipeline", "strata-stage-15-30"


def _kubelet(name: str) -> tuple[int, Callable[[], None]]:
    """One real replica process per pod; a stage pod reports itself 95 % busy."""
    return start_replica(name, *(["--busy-ratio", "0.95"] if name.startswith(STAGE) else []))


@pytest.fixture
def kube() -> Iterator[FakeKubeApi]:
    api = FakeKubeApi(_kubelet).start()
    api.add_deployment(HEAD, replicas=1)
    api.add_deployment(STAGE, replicas=1)
    try:
        yield api
    finally:
        api.stop()


def _config(api_server: str, stages: object) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "platform": {"kind": "kubernetes", "api_server": api_server, "api_timeout_s": 2},
        "autoscaler": {"period_s": 1},
        "tiers": {"pipeline": {"stages": stages, "stage_scaling": {"target_busy_pct": 50}}},
    })


STAGES = [{"layers": "0:15"}, {"layers": "15:30", "min_replicas": 1, "max_replicas": 3}]


def test_the_platform_runs_the_head_and_each_stage_as_a_deployment() -> None:
    platform = KubernetesPlatform.from_config(_config("http://127.0.0.1:1", STAGES),
                                              api=object())  # type: ignore[arg-type]
    assert {t: (k.deployment, k.service) for t, k in platform.tiers_.items()} == {
        "pipeline": (HEAD, HEAD), "stage-15-30": (STAGE, STAGE)}
    auto = ClusterConfig.model_validate({
        "platform": {"kind": "kubernetes"},
        "tiers": {"pipeline": {"stages": "auto", "num_stages": 2}}})
    with pytest.raises(ValueError, match="write the layer ranges out"):
        KubernetesPlatform.from_config(auto, api=object())  # type: ignore[arg-type]


async def test_the_controller_grows_the_busy_stage_and_leaves_the_head(
        kube: FakeKubeApi) -> None:
    stop = asyncio.Event()
    run = asyncio.create_task(run_controller(_config(kube.url, STAGES), stop))
    try:
        deadline = time.monotonic() + 60
        while kube.spec_replicas(STAGE) < 2:
            assert not run.done(), run
            assert time.monotonic() < deadline, "the busy stage was never scaled up"
            await asyncio.sleep(0.2)
        # 95 % busy against a 50 % target: up to its max_replicas, never past it.
        while kube.spec_replicas(STAGE) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        assert kube.spec_replicas(STAGE) == 3
        assert kube.spec_replicas(HEAD) == 1  # one head per pipeline, never scaled
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
