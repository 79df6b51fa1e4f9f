"""The Kubernetes platform against a fake API server (``fake_kube_api``).

No Kubernetes API server can run on these machines, so this fake, which serves the real
REST paths the official client calls (the scale subresource, EndpointSlice list/watch,
pods), is the one mock allowed in the suite. Everything else is real: the official
``kubernetes`` client over HTTP, and each pod is a real replica process
(``tests/integration/fake_replica.py``: /health, /load, /drain, slow completions) that
the fake's "kubelet" starts and its readiness probe polls.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from strata.config import PlatformOptions
from strata.platform.kubernetes import (
    DELETION_COST,
    LOWEST_DELETION_COST,
    KubernetesPlatform,
    KubeTier,
    api_client,
)
from strata.platform.process import free_port
from tests.platform.fake_kube_api import FakeKubeApi

REPLICA = Path(__file__).parents[1] / "integration" / "fake_replica.py"
DEPLOYMENT = "strata-engine"


def start_replica(name: str, *args: str) -> tuple[int, Callable[[], None]]:
    """The kubelet: one real replica process per pod (``args``: more fake_replica flags)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPLICA), "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    return port, stop


@pytest.fixture
def fake() -> Iterator[FakeKubeApi]:
    api = FakeKubeApi(start_replica).start()
    api.add_deployment(DEPLOYMENT, replicas=1, requests={"cpu": "2"})
    try:
        yield api
    finally:
        api.stop()


def options(fake: FakeKubeApi, **overrides: object) -> PlatformOptions:
    base: dict[str, object] = dict(kind="kubernetes", api_server=fake.url, api_timeout_s=1.0,
                                   api_backoff_s=0.05, api_backoff_max_s=0.2,
                                   watch_timeout_s=5, drain_timeout_s=10.0,
                                   stop_timeout_s=5.0)
    return PlatformOptions(**(base | overrides))


@pytest.fixture
async def platform(fake: FakeKubeApi) -> AsyncIterator[KubernetesPlatform]:
    opts = options(fake)
    p = KubernetesPlatform({"engine": KubeTier(DEPLOYMENT, DEPLOYMENT)}, opts, api_client(opts))
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def until(check: Callable[[], bool], platform: KubernetesPlatform, timeout_s: float,
                what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await platform.wait_changed(0.2)


async def test_scale_up_lists_ready_endpoints_with_capacity(
        fake: FakeKubeApi, platform: KubernetesPlatform) -> None:
    assert platform.desired("engine") == 1  # adopted from the Deployment's spec.replicas
    await platform.scale("engine", 2)
    await until(lambda: len(platform.endpoints("engine")) == 2, platform, 30, "2 endpoints")
    assert fake.spec_replicas(DEPLOYMENT) == 2
    assert {e.replica_id for e in platform.endpoints("engine")} == set(
        fake.pod_names(DEPLOYMENT))
    async with httpx.AsyncClient() as http:
        for e in platform.endpoints("engine"):
            assert (await http.get(e.url + "/health")).status_code == 200
    await until(lambda: all(r.phase == "ready" for r in platform.replicas("engine"))
                and len(platform.replicas("engine")) == 2, platform, 10, "ready replicas")
    assert [r.capacity for r in platform.replicas("engine")] == [2.0, 2.0]  # cpu request


async def test_scale_down_drains_then_deletes_exactly_the_victim(
        fake: FakeKubeApi, platform: KubernetesPlatform) -> None:
    await platform.scale("engine", 2)
    await until(lambda: len(platform.endpoints("engine")) == 2, platform, 30, "2 endpoints")
    before = {e.replica_id: e.url for e in platform.endpoints("engine")}
    async with httpx.AsyncClient(timeout=30) as http:
        # A slow request on each replica: whichever is removed must finish its own.
        slow = [asyncio.create_task(http.post(url + "/v1/completions", json={"sleep_s": 2.0}))
                for url in before.values()]
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await platform.scale("engine", 1)
        await until(lambda: len(platform.endpoints("engine")) == 1, platform, 5,
                    "the victim out of endpoints")
        assert time.monotonic() - t0 < 1.5  # out of traffic at once, long before it is idle
        draining = [r for r in platform.replicas("engine") if r.phase == "draining"]
        assert len(draining) == 1
        victim = draining[0].replica_id
        assert fake.spec_replicas(DEPLOYMENT) == 2  # not lowered while requests run
        results = await asyncio.gather(*slow)
    assert [r.status_code for r in results] == [200, 200]
    await until(lambda: victim in fake.deleted_pods, platform, 20, "the victim deleted")
    assert fake.deleted_pods == [victim]
    assert fake.spec_replicas(DEPLOYMENT) == 1
    survivor = next(r for r in before if r != victim)
    assert [e.replica_id for e in platform.endpoints("engine")] == [survivor]
    # The deletion cost was set before spec.replicas came down.
    patched = max(i for i, (m, p) in enumerate(fake.requests)
                  if m == "PATCH" and p.endswith("/pods/" + victim))
    lowered = max(i for i, (m, p) in enumerate(fake.requests)
                  if m == "PUT" and p.endswith("/scale"))
    assert patched < lowered
    await until(lambda: victim not in [r.replica_id for r in platform.replicas("engine")],
                platform, 10, "the victim gone from replicas")


async def test_deletion_cost_is_the_lowest(fake: FakeKubeApi,
                                           platform: KubernetesPlatform) -> None:
    await until(lambda: len(platform.endpoints("engine")) == 1, platform, 30, "1 endpoint")
    name = platform.endpoints("engine")[0].replica_id
    await platform._drain_pod("engine", name)
    pod = fake.pod(name)
    assert pod is not None and pod.annotations[DELETION_COST] == str(LOWEST_DELETION_COST)


async def test_drain_replaces_the_replica(fake: FakeKubeApi,
                                         platform: KubernetesPlatform) -> None:
    await until(lambda: len(platform.endpoints("engine")) == 1, platform, 30, "1 endpoint")
    old = platform.endpoints("engine")[0].replica_id
    await platform.drain(old)
    await until(lambda: [e.replica_id for e in platform.endpoints("engine")] not in ([], [old]),
                platform, 30, "a replacement")
    assert fake.spec_replicas(DEPLOYMENT) == 1 and old in fake.deleted_pods


async def test_scale_write_retries_on_409_conflict_and_5xx(
        fake: FakeKubeApi, platform: KubernetesPlatform) -> None:
    fake.inject("PUT", r"/deployments/strata-engine/scale$", 409)
    fake.inject("GET", r"/deployments/strata-engine/scale$", 503, times=2)
    fake.inject("PUT", r"/deployments/strata-engine/scale$", 500)
    await platform.scale("engine", 2)
    await until(lambda: fake.spec_replicas(DEPLOYMENT) == 2, platform, 10, "spec.replicas 2")
    assert platform.conflicts == 1
    assert fake.scale_writes == [2]  # one accepted write, after the failures


async def test_stale_resource_version_is_a_conflict(fake: FakeKubeApi,
                                                    platform: KubernetesPlatform) -> None:
    # Another writer moves the Deployment on between our read and our write: the real
    # server's optimistic concurrency answers 409, and the platform reads again.
    kt = platform.tiers_["engine"]
    scale = platform.apps.read_namespaced_deployment_scale(kt.deployment, "default")
    fake.touch_deployment(DEPLOYMENT)
    scale.spec.replicas = 3
    with pytest.raises(Exception) as err:
        platform.apps.replace_namespaced_deployment_scale(kt.deployment, "default", scale)
    assert getattr(err.value, "status", None) == 409
    await platform._write_scale("engine", 2)
    assert fake.spec_replicas(DEPLOYMENT) == 2


async def test_api_timeout_is_retried(fake: FakeKubeApi, platform: KubernetesPlatform) -> None:
    fake.inject("GET", r"/deployments/strata-engine/scale$", 0, delay_s=1.5)  # > api_timeout_s
    await platform.scale("engine", 2)
    await until(lambda: fake.spec_replicas(DEPLOYMENT) == 2, platform, 10, "spec.replicas 2")


async def test_watch_relists_after_410_and_reconnects_after_errors(
        fake: FakeKubeApi, platform: KubernetesPlatform) -> None:
    await until(lambda: len(platform.endpoints("engine")) == 1, platform, 30, "1 endpoint")
    assert platform.watch.relists == 1
    fake.compact()  # the open watch gets ERROR 410 Gone
    await until(lambda: platform.watch.relists == 2, platform, 10, "a fresh list")
    fake.inject("GET", r"/endpointslices$", 500, times=2, watch=True)
    fake.compact()  # end the open watch again; the next two watches fail with 500
    await platform.scale("engine", 2)
    await until(lambda: len(platform.endpoints("engine")) == 2, platform, 30,
                "2 endpoints after the watch errors")
    watches = [p for m, p in fake.requests if "endpointslices" in p and "watch=" in p]
    assert len(watches) >= 4


async def test_controller_command_scales_the_deployment(fake: FakeKubeApi,
                                                         tmp_path: Path) -> None:
    """``strata controller``: the autoscaler loop in-cluster, no gateway."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"""
platform: {{kind: kubernetes, api_server: "{fake.url}", api_timeout_s: 2}}
autoscaler: {{period_s: 1}}
tiers:
  engine:
    replicas: 1
    autoscaling: {{policy: hpa, min_replicas: 2, max_replicas: 3}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "strata.cli", "controller", "-f",
                             str(cluster)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while fake.spec_replicas(DEPLOYMENT) != 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        assert fake.spec_replicas(DEPLOYMENT) == 2  # below min_replicas: brought up at once
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out


async def test_cluster_gateway_follows_the_endpointslices(fake: FakeKubeApi) -> None:
    """``strata serve`` with ``platform.kind: kubernetes``: the gateway's replica set is fed
    from the same EndpointSlice view, and a scale-down drains the pod out of it first."""
    from strata.cluster import Cluster
    from strata.config import ClusterConfig

    config = ClusterConfig.model_validate({
        "platform": options(fake).model_dump(exclude_defaults=True),
        "gateway": {"port": 0},
        "tiers": {"engine": {"replicas": 2}},
    })
    cluster = Cluster(config, internal_token="t0ken")
    assert isinstance(cluster.platform, KubernetesPlatform)
    platform = cluster.platform
    stop = asyncio.Event()
    run = asyncio.create_task(cluster.run(stop))
    try:
        await until(lambda: len(cluster.gateway.replicas.replicas) == 2, platform, 30,
                    "2 replicas in the gateway")
        assert set(cluster.gateway.replicas.replicas) == {
            e.url for e in platform.endpoints("engine")}
        await platform.scale("engine", 1)
        await until(lambda: len(cluster.gateway.replicas.replicas) == 1, platform, 10,
                    "the victim out of the gateway")
        await until(lambda: fake.spec_replicas(DEPLOYMENT) == 1, platform, 10, "spec 1")
    finally:
        stop.set()
        await run


def test_gateway_endpoints_from_kubernetes(fake: FakeKubeApi) -> None:
    """``strata gateway --endpoints-from kubernetes`` routes to the Service's ready pods."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "strata.cli", "gateway", "--endpoints-from", "kubernetes",
         "--kube-api-server", fake.url, "--port", str(port), "--tier", "engine"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        resp = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                                  json={"model": "fake", "prompt": "hi", "max_tokens": 1},
                                  timeout=5)
                if resp.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert resp is not None and resp.status_code == 200, resp and resp.text
        (pod,) = fake.pod_names(DEPLOYMENT)
        pod_port = fake.pod(pod).port  # type: ignore[union-attr]
        assert resp.headers["x-strata-replica"].endswith(f":{pod_port}")
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


async def test_unequal_pod_requests_reach_the_hpa_as_capacities(
        fake: FakeKubeApi, platform: KubernetesPlatform) -> None:
    from strata.autoscale.observe import Observer, ScrapeSource

    await until(lambda: len(platform.endpoints("engine")) == 1, platform, 30, "1 endpoint")
    with fake.lock:
        fake.deployments[("default", DEPLOYMENT)].requests = {"cpu": "500m"}  # new pods
    await platform.scale("engine", 2)
    await until(lambda: sorted(r.capacity for r in platform.replicas("engine")) == [0.5, 2.0],
                platform, 30, "capacities 0.5 and 2")

    async def no_gateway() -> str:
        return ""

    async with httpx.AsyncClient() as http:
        observer = Observer(platform, ScrapeSource(no_gateway, http, 60.0), http)
        state = await observer.observe("engine", time.monotonic())
    assert sorted(s.capacity for s in state.replicas) == [0.5, 2.0]


async def test_a_drained_pod_left_by_a_failed_write_is_removed_not_doubled(
        fake: FakeKubeApi, platform: KubernetesPlatform) -> None:
    await platform.scale("engine", 3)
    await until(lambda: len(platform.endpoints("engine")) == 3, platform, 30, "3 endpoints")
    # Every write of the scale fails for a while: the first attempt's victim is drained,
    # the retries must not drain a second pod for the same scale-down.
    fake.inject("PUT", r"/deployments/strata-engine/scale$", 500, times=7)
    await platform.scale("engine", 2)
    await until(lambda: fake.spec_replicas(DEPLOYMENT) == 2, platform, 20, "spec 2")
    await until(lambda: len(fake.deleted_pods) == 1, platform, 20, "one pod deleted")
    await until(lambda: len(platform.endpoints("engine")) == 2
                and len(platform.replicas("engine")) == 2, platform, 20, "2 replicas")
    assert not [r for r in platform.replicas("engine") if r.phase != "ready"]
    # The count goes back up while a drained pod waits for a failing write: it is
    # deleted (the ReplicaSet replaces it) rather than left running drained.
    fake.inject("PUT", r"/deployments/strata-engine/scale$", 500, times=1000)
    await platform.scale("engine", 1)
    await until(lambda: len([r for r in platform.replicas("engine")
                             if r.phase == "draining"]) == 1, platform, 10, "a drain")
    await platform.scale("engine", 2)
    await until(lambda: len(fake.deleted_pods) == 2, platform, 20, "the drained pod deleted")
    await until(lambda: len(platform.endpoints("engine")) == 2
                and all(r.phase == "ready" for r in platform.replicas("engine"))
                and len(platform.replicas("engine")) == 2, platform, 30, "2 ready replicas")
    assert fake.spec_replicas(DEPLOYMENT) == 2
    assert fake.scale_writes == [3, 2]  # never lowered to 1: the pod was replaced
