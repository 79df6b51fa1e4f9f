"""The gateway's lifecycle over real loopback HTTP: drain, discovery before ready, bounds."""

from __future__ import annotations

import asyncio
import json

from strata.gateway.app import Gateway
from strata.gateway.proxy import ProxyConfig

from .servers import FlakyServer, completion, fake, gateway, metric, serve, wait_for


async def test_drain_finishes_in_flight_and_refuses_new_requests() -> None:
    async with serve(fake(ttft_ms=5, itl_ms=40, output_tokens=15)) as be, \
            gateway([be]) as (gw, client):
        async with client.stream("POST", "/v1/completions",
                                 json=completion(max_tokens=15, stream=True)) as resp:
            chunks = resp.aiter_text()
            first = await chunks.__anext__()
            drain = asyncio.create_task(gw.drain(timeout_s=10))
            await wait_for(lambda: gw.draining)
            health = await client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
            new = await client.post("/v1/completions", json=completion())
            assert new.status_code == 503 and new.headers["retry-after"] == "1"
            assert new.json()["error"]["code"] == "draining"
            text = first + "".join([c async for c in chunks])
        assert text.endswith("data: [DONE]\n\n")
        assert await drain == 0  # nothing had to be ended


async def test_past_the_drain_timeout_streams_get_an_error_event_others_a_503() -> None:
    async with serve(fake(ttft_ms=5, itl_ms=50, output_tokens=2000)) as be, \
            gateway([be]) as (gw, client):
        async def stream() -> str:
            body = completion(max_tokens=2000, stream=True)
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                return "".join([c async for c in resp.aiter_text()])

        streaming = asyncio.create_task(stream())
        await wait_for(lambda: gw.replicas.replicas[be].in_flight == 1)
        assert await gw.drain(timeout_s=0.3) == 1
        events = [line for line in (await streaming).splitlines() if line.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["code"] == "drain_timeout"
    slow = FlakyServer("silent", silent_s=30)
    slow_url = await slow.start()
    try:
        async with gateway([slow_url], max_in_flight_per_model=1) as (gw, client):
            silent = asyncio.create_task(client.post("/v1/completions", json=completion()))
            await wait_for(lambda: slow.posts == 1)
            queued = asyncio.create_task(client.post("/v1/completions", json=completion()))
            await wait_for(lambda: len(gw._active) == 2)
            assert await gw.drain(timeout_s=0.3) == 2
            for answered in (await silent, await queued):
                assert answered.status_code == 503 and answered.headers["retry-after"] == "1"
                assert answered.json()["error"]["code"] == "drain_timeout"
            assert slow.posts == 1
    finally:
        slow.close()


async def test_configured_models_are_listed_and_held_until_a_replica_is_ready() -> None:
    holder: dict[str, Gateway] = {}
    stack: list = []

    async def on_demand(tier: str) -> None:
        await asyncio.sleep(0.3)  # a replica takes a while to start
        cm = serve(fake(model="m1"))
        stack.append(cm)
        await holder["gw"].set_endpoints([await cm.__aenter__()])

    try:
        async with gateway([], on_demand=on_demand, wait_ready=0,
                           served_models=("m1",)) as (gw, client):
            holder["gw"] = gw
            models = (await client.get("/v1/models")).json()["data"]
            assert [m["id"] for m in models] == ["m1"]  # before any replica exists
            other = await client.post("/v1/completions", json=completion(model="m2"))
            assert other.status_code == 404  # not held: no replica will ever serve it
            r = await client.post("/v1/completions", json=completion(model="m1"))
            assert r.status_code == 200, r.text
            models = (await client.get("/v1/models")).json()["data"]
            assert [m["id"] for m in models] == ["m1"]  # the replica's card, once
    finally:
        for cm in stack:
            await cm.__aexit__(None, None, None)


async def test_per_model_and_per_replica_state_is_bounded() -> None:
    async with serve(fake()) as be, serve(fake()) as be2, \
            gateway([be, be2], policy="round_robin") as (gw, client):
        for i in range(20):  # model names the client invents
            r = await client.post("/v1/completions", json=completion(model=f"made-up-{i}"))
            assert r.status_code == 404
        for _ in range(2):
            assert (await client.post("/v1/completions", json=completion())).status_code == 200
        assert len(gw.admission) == 0  # idle queues are forgotten
        text = (await client.get("/metrics")).text
        assert "made-up" not in text  # unknown names share the label "other"
        assert metric(text, "strata_gateway_requests_routed_total", replica=be2) > 0
        await gw.set_endpoints([be])
        text = (await client.get("/metrics")).text
        assert be2 not in text  # a replica that left leaves no series behind


async def test_past_max_pending_requests_the_excess_gets_503_with_retry_after() -> None:
    slow = FlakyServer("silent", silent_s=1.0)
    slow_url = await slow.start()
    try:
        async with gateway([slow_url], max_pending_requests=2,
                           proxy=ProxyConfig(hold_timeout_s=1)) as (gw, client):
            rs = await asyncio.gather(*(client.post("/v1/completions", json=completion())
                                        for _ in range(4)))
            codes = sorted(r.status_code for r in rs)
            assert codes == [200, 200, 503, 503]
            refused = [r for r in rs if r.status_code == 503]
            assert all(r.headers["retry-after"] == "1" and
                       r.json()["error"]["code"] == "overloaded" for r in refused)
    finally:
        slow.close()
