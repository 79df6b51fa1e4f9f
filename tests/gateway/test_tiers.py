"""One gateway in front of several tiers: routed by model, listed together, woken apart.

Real HTTP on loopback: fake OpenAI backends (``strata.bench.fake_backend``) serving
different model names behind a gateway configured with one ``TierRoute`` per tier.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from strata.gateway.app import GatewayConfig, create_app
from strata.gateway.proxy import ProxyConfig
from strata.gateway.tiers import TierRoute
from tests.gateway.servers import FAST_POLL, completion, fake, metric, serve, wait_for


async def test_requests_go_to_the_tier_of_their_model() -> None:
    async with serve(fake(model="model-a")) as a, serve(fake(model="model-b")) as b:
        gw = create_app(GatewayConfig(replica_set=FAST_POLL, tiers=(
            TierRoute("ta", ("model-a",), (a,)), TierRoute("tb", ("model-b",), (b,)))))
        async with serve(gw) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            await wait_for(lambda: all(lane.replicas.ready_count() == 1 for lane in gw.lanes))
            for model, replica in (("model-a", a), ("model-b", b), ("model-a", a)):
                r = await client.post("/v1/completions", json=completion(model=model))
                assert r.status_code == 200, r.text
                assert r.headers["x-strata-replica"] == replica
                assert r.json()["model"] == model
            # No model at all: the first tier.
            r = await client.post("/v1/completions", json=completion(model=""))
            assert r.headers["x-strata-replica"] == a

            listed = (await client.get("/v1/models")).json()["data"]
            assert sorted(m["id"] for m in listed) == ["model-a", "model-b"]

            r = await client.post("/v1/completions", json=completion(model="gpt-9"))
            assert r.status_code == 404
            assert r.json()["error"] == {"message": "The model `gpt-9` does not exist.",
                                         "type": "NotFoundError", "param": "model",
                                         "code": "model_not_found"}

            health = (await client.get("/health")).json()
            assert health["tiers"] == {"ta": 1, "tb": 1} and health["ready_replicas"] == 2
            text = (await client.get("/metrics")).text
            assert metric(text, "strata_cluster_requests_received_total", tier="ta") == 3
            assert metric(text, "strata_cluster_requests_received_total", tier="tb") == 1
            assert metric(text, "strata_gateway_ttft_seconds_count", model="model-b") == 1
            assert 'strata_gateway_requests_in_flight{tier="tb"} 0.0' in text


async def test_a_tier_at_zero_is_woken_alone_while_the_other_serves() -> None:
    woken: list[str] = []
    release = asyncio.Event()
    async with serve(fake(model="model-a")) as a, serve(fake(model="model-b")) as b:

        async def on_demand(tier: str) -> None:
            woken.append(tier)
            await release.wait()  # the platform takes its time to start a replica
            await gw.set_endpoints([b], tier)

        gw = create_app(GatewayConfig(
            replica_set=FAST_POLL, proxy=ProxyConfig(hold_timeout_s=20),
            tiers=(TierRoute("ta", ("model-a",), (a,)), TierRoute("tb", ("model-b",)))),
            on_demand=on_demand)
        async with serve(gw) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            await wait_for(lambda: gw.lanes["ta"].replicas.ready_count() == 1)
            held = asyncio.create_task(client.post("/v1/completions",
                                                   json=completion(model="model-b")))
            await wait_for(lambda: woken == ["tb"])
            # The other tier is not held behind it.
            r = await asyncio.wait_for(
                client.post("/v1/completions", json=completion(model="model-a")), 5)
            assert r.status_code == 200 and not held.done()
            release.set()
            r = await asyncio.wait_for(held, 20)
            assert r.status_code == 200, r.text
            assert r.headers["x-strata-replica"] == b
            assert woken == ["tb"]  # nothing woke tier ta


@pytest.mark.parametrize("served", [(), ("configured",)])
async def test_a_model_only_a_replica_reports_is_routed_to_its_tier(
        served: tuple[str, ...]) -> None:
    async with serve(fake(model="model-a")) as a, serve(fake(model="runtime")) as b:
        gw = create_app(GatewayConfig(replica_set=FAST_POLL, tiers=(
            TierRoute("ta", ("model-a",), (a,)), TierRoute("tb", served, (b,)))))
        async with serve(gw) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            await wait_for(lambda: gw.lanes["tb"].replicas.known_models() >= {"runtime"})
            r = await client.post("/v1/completions", json=completion(model="runtime"))
            assert r.status_code == 200 and r.headers["x-strata-replica"] == b


def test_tier_names_and_models_must_be_unique() -> None:
    with pytest.raises(ValueError, match="tier names must be unique"):
        GatewayConfig(tiers=(TierRoute("t", ("a",)), TierRoute("t", ("b",))))
    with pytest.raises(ValueError, match="each model is served by one tier"):
        GatewayConfig(tiers=(TierRoute("t", ("a",)), TierRoute("u", ("a",))))
