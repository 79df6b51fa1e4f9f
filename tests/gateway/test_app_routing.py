"""Routing through the live gateway: load reports, metrics fallback, prefixes, membership."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from .servers import LoadBackend, completion, fake, gateway, metric, report, serve, wait_for


async def replica_of(client, body: dict[str, Any]) -> str:
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.headers["x-strata-replica"]


async def test_resource_match_follows_load_reports() -> None:
    a = LoadBackend(report(waiting=20, waiting_prompt_tokens=50_000))
    b = LoadBackend(report())
    async with serve(a) as ua, serve(b) as ub, gateway([ua, ub]) as (gw, client):
        await wait_for(lambda: all(r.load is not None for r in gw.replicas.replicas.values()))
        assert {await replica_of(client, completion()) for _ in range(5)} == {ub}
        a.report, b.report = report(), report(waiting=20, waiting_prompt_tokens=50_000)
        await wait_for(lambda: gw.replicas.replicas[ub].load.waiting == 20)
        assert {await replica_of(client, completion()) for _ in range(5)} == {ua}


async def test_a_burst_spreads_over_idle_replicas() -> None:
    backends = [LoadBackend(report(), ttft_ms=200) for _ in range(2)]
    async with serve(backends[0]) as u0, serve(backends[1]) as u1, \
            gateway([u0, u1]) as (gw, client):
        await wait_for(lambda: all(r.load is not None for r in gw.replicas.replicas.values()))
        rs = await asyncio.gather(*(client.post("/v1/completions", json=completion())
                                    for _ in range(10)))
        counts = Counter(r.headers["x-strata-replica"] for r in rs)
        assert min(counts.values()) >= 4, counts  # in-flight counts steer, not stale reports


async def test_cached_prefix_attracts_the_follow_up_turn() -> None:
    backends = [LoadBackend(report()) for _ in range(3)]
    async with serve(backends[0]) as u0, serve(backends[1]) as u1, serve(backends[2]) as u2, \
            gateway([u0, u1, u2]) as (gw, client):
        await wait_for(lambda: all(r.load is not None for r in gw.replicas.replicas.values()))
        history = "".join(f"turn {i}: some shared conversation text. " for i in range(200))
        first = await replica_of(client, completion(prompt=history))
        for i in range(4):
            follow = history + f" new question {i}?"
            assert await replica_of(client, completion(prompt=follow)) == first


async def test_prefix_affinity_is_sticky_through_the_gateway() -> None:
    async with serve(fake()) as u0, serve(fake()) as u1, serve(fake()) as u2, \
            gateway([u0, u1, u2], policy="prefix_affinity") as (gw, client):
        seen: dict[int, set[str]] = {}
        for p in range(12):
            prompt = f"system prompt number {p} " * 40
            for _ in range(2):
                seen.setdefault(p, set()).add(await replica_of(client, completion(prompt=prompt)))
        assert all(len(s) == 1 for s in seen.values())
        assert len(set().union(*seen.values())) >= 2


class VllmLike:
    """An OpenAI server without /load whose /metrics has vLLM's series."""

    def __init__(self, waiting: int) -> None:
        self.waiting = waiting
        self.inner = fake()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in ("/load", "/metrics"):
            if scope["path"] == "/load":
                status, body = 404, b'{"error": {"message": "no"}}'
            else:
                status = 200
                body = (f"vllm:num_requests_running{{model_name=\"m\"}} 1\n"
                        f"vllm:num_requests_waiting{{model_name=\"m\"}} {self.waiting}\n"
                        f"vllm:kv_cache_usage_perc{{model_name=\"m\"}} 0.5\n").encode()
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        await self.inner(scope, receive, send)


async def test_vllm_metrics_stand_in_for_load_reports() -> None:
    busy, idle = VllmLike(waiting=9), VllmLike(waiting=0)
    async with serve(busy) as ub, serve(idle) as ui, \
            gateway([ub, ui], policy="least_requests") as (gw, client):
        await wait_for(lambda: all(r.load_source == "metrics"
                                   for r in gw.replicas.replicas.values()))
        assert gw.replicas.replicas[ub].metrics_load.waiting == 9
        assert {await replica_of(client, completion()) for _ in range(4)} == {ui}


async def test_plain_openai_servers_fall_back_to_in_flight_counts() -> None:
    async with serve(fake()) as u0, gateway([u0]) as (gw, client):
        await wait_for(lambda: gw.replicas.replicas[u0].load_source == "none")
        assert await replica_of(client, completion()) == u0


async def test_models_are_aggregated_and_route_by_model() -> None:
    async with serve(fake(model="alpha")) as ua, serve(fake(model="beta")) as ub, \
            gateway([ua, ub]) as (gw, client):
        await wait_for(lambda: all(r.models for r in gw.replicas.replicas.values()))
        ids = sorted(m["id"] for m in (await client.get("/v1/models")).json()["data"])
        assert ids == ["alpha", "beta"]
        for _ in range(3):
            assert await replica_of(client, completion(model="beta")) == ub
            assert await replica_of(client, completion(model="alpha")) == ua


async def test_endpoints_change_at_runtime() -> None:
    async with serve(fake()) as u0, serve(fake()) as u1, gateway([u0, u1]) as (gw, client):
        await gw.set_endpoints([u1])
        assert {await replica_of(client, completion()) for _ in range(4)} == {u1}
        text = (await client.get("/metrics")).text
        assert metric(text, "strata_tier_replicas", tier="engine") == 1
        await gw.set_endpoints([u0, u1])
        await wait_for(lambda: gw.replicas.ready_count() == 2)


async def test_routing_metrics_are_exported() -> None:
    async with serve(fake()) as u0, gateway([u0], policy="least_kv") as (gw, client):
        for _ in range(3):
            await replica_of(client, completion())
        text = (await client.get("/metrics")).text
        assert metric(text, "strata_gateway_requests_routed_total",
                      replica=u0, policy="least_kv") == 3
        assert metric(text, "strata_gateway_routing_decision_seconds_count",
                      policy="least_kv") == 3
        assert metric(text, "strata_gateway_replica_healthy", replica=u0) == 1
        assert "strata_gateway_upstream_errors_total" in text or \
            "strata_gateway_upstream_errors" in text
        assert json.loads((await client.get("/health")).text)["ready_replicas"] == 1
