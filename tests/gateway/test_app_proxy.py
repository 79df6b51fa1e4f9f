"""The gateway's proxying over real loopback HTTP: streaming, retries, cancellation, hold."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest
from prometheus_client.exposition import generate_latest

from strata.gateway.app import Gateway
from strata.gateway.proxy import ProxyConfig

from .servers import FAST_POLL, FlakyServer, completion, fake, gateway, metric, serve, wait_for


async def test_streams_through_as_tokens_are_produced() -> None:
    async with serve(fake(ttft_ms=10, itl_ms=80, output_tokens=6)) as be, \
            gateway([be]) as (gw, client):
        arrivals: list[float] = []
        raw = b""
        t0 = time.monotonic()
        async with client.stream("POST", "/v1/completions",
                                 json=completion(max_tokens=6, stream=True)) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["x-strata-replica"] == be
            async for chunk in resp.aiter_raw():
                arrivals.append(time.monotonic() - t0)
                raw += chunk
        texts = [json.loads(line[6:])["choices"][0]["text"]
                 for line in raw.decode().splitlines() if line.startswith("data: {")]
        assert texts == [" t0", " t1", " t2", " t3", " t4", " t5"]
        assert raw.endswith(b"data: [DONE]\n\n")
        # Tokens come out 80 ms apart: the first must reach the client long before the last.
        assert arrivals[-1] - arrivals[0] > 0.3
        assert len(arrivals) >= 5
        text = (await client.get("/metrics")).text
        assert metric(text, "strata_gateway_ttft_seconds_count", model="strata-fake") == 1
        assert metric(text, "strata_gateway_e2e_seconds_count", model="strata-fake") == 1


async def test_the_gateway_counts_arrivals_for_the_autoscaler() -> None:
    """Every generation POST counts, refused ones too: the demand the autoscaler reads
    (arrival rate, learned capacity), served by a standalone gateway as by `strata serve`."""
    async with serve(fake()) as be, gateway([be]) as (gw, client):
        assert (await client.post("/v1/completions", json=completion())).status_code == 200
        bad = await client.post("/v1/chat/completions", json={"model": "strata-fake"})
        assert bad.status_code == 400
        await client.get("/v1/models")
        text = (await client.get("/metrics")).text
        assert metric(text, "strata_cluster_requests_received_total", tier="engine") == 2


async def test_non_streaming_and_chat_bodies_pass_unchanged() -> None:
    async with serve(fake()) as be, gateway([be]) as (gw, client):
        direct = await client.post(be + "/v1/chat/completions", json={
            "model": "strata-fake", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3})
        via = await client.post("/v1/chat/completions", json={
            "model": "strata-fake", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3})
        assert via.status_code == 200
        a, b = direct.json(), via.json()
        for d in (a, b):
            d.pop("id"), d.pop("created")
        assert a == b


async def test_retries_only_what_never_started() -> None:
    """A closed port (never sent) and 503 + Retry-After ("not started") move the request."""
    busy = FlakyServer("busy")
    busy_url = await busy.start()
    closed = FlakyServer("ok")
    closed_url = await closed.start()
    try:
        async with serve(fake()) as good, \
                gateway([busy_url, closed_url, good], policy="round_robin") as (gw, client):
            closed.close()  # the port now refuses connections
            for _ in range(6):
                r = await client.post("/v1/completions", json=completion(stream=True))
                assert r.status_code == 200, r.text
                assert r.headers["x-strata-replica"] == good
                assert r.text.endswith("data: [DONE]\n\n")
            assert busy.posts >= 1
            text = (await client.get("/metrics")).text
            assert metric(text, "strata_gateway_retries_total") >= busy.posts
            # "Not started" is no fault: the busy replica is never ejected for it.
            assert metric(text, "strata_gateway_ejections_total", replica=busy_url) == 0
            assert metric(text, "strata_gateway_ejections_total", replica=closed_url) == 1
    finally:
        busy.close()


@pytest.mark.parametrize("mode", ["die", "hangup"])
async def test_a_request_that_reached_a_replica_is_never_run_twice(mode: str) -> None:
    bad = FlakyServer(mode)
    bad_url = await bad.start()
    backend = fake()
    try:
        async with serve(backend) as good, \
                gateway([bad_url, good], policy="round_robin") as (gw, client):
            codes = [(await client.post("/v1/completions", json=completion())).status_code
                     for _ in range(2)]
            assert sorted(codes) == [200, 502]
            assert bad.posts == 1
            text = (await client.get("/metrics")).text
            assert metric(text, "strata_gateway_retries_total") == 0
            assert metric(text, "strata_gateway_upstream_errors_total", replica=bad_url) == 1
    finally:
        bad.close()


async def test_client_errors_pass_through_and_faults_eject() -> None:
    """A 4xx is the client's; a 5xx is passed on unretried and counts toward ejection."""
    bad = FlakyServer("400")
    bad_url = await bad.start()
    try:
        async with gateway([bad_url]) as (gw, client):
            replica = gw.replicas.replicas[bad_url]
            for _ in range(5):
                r = await client.post("/v1/completions", json=completion())
                assert r.status_code == 400
                assert r.json()["error"]["message"] == "400 from the replica"
            assert replica.routable(time.monotonic()) and replica.consecutive_failures == 0
            bad.mode = "500"
            for _ in range(3):
                r = await client.post("/v1/completions", json=completion())
                assert r.status_code == 500
                assert r.json()["error"]["message"] == "500 from the replica"
            assert bad.posts == 8  # one post per request: nothing was retried
            assert not replica.routable(time.monotonic())  # eject_after_failures=3
            text = (await client.get("/metrics")).text
            assert metric(text, "strata_gateway_ejections_total", replica=bad_url) == 1
            assert metric(text, "strata_gateway_retries_total") == 0
    finally:
        bad.close()


async def test_failing_replica_is_ejected_and_returns_when_healthy() -> None:
    bad = FlakyServer("500")
    bad_url = await bad.start()
    try:
        async with serve(fake()) as good, \
                gateway([bad_url, good], policy="round_robin") as (gw, client):
            codes = [(await client.post("/v1/completions", json=completion())).status_code
                     for _ in range(8)]
            # eject_after_failures=3 by default; then it gets no more traffic.
            assert bad.posts == 3 and codes.count(500) == 3
            replica = gw.replicas.replicas[bad_url]
            assert not replica.routable(time.monotonic())
            text = (await client.get("/metrics")).text
            assert metric(text, "strata_gateway_ejections_total", replica=bad_url) == 1
            assert metric(text, "strata_tier_replicas", tier="engine") == 1
            bad.mode = "ok"  # repaired: back after the ejection time and a health check
            await wait_for(lambda: replica.routable(time.monotonic()), 5)
            seen = {(await client.post("/v1/completions", json=completion(stream=True)))
                    .headers["x-strata-replica"] for _ in range(4)}
            assert seen == {bad_url, good}
    finally:
        bad.close()


async def test_every_replica_busy_gives_503_with_retry_after() -> None:
    bad = FlakyServer("busy")
    bad_url = await bad.start()
    try:
        async with gateway([bad_url]) as (gw, client):
            r = await client.post("/v1/completions", json=completion())
            assert r.status_code == 503 and r.headers["retry-after"] == "2"
            err = r.json()["error"]
            assert err["code"] == "replicas_busy" and "busy from the replica" in err["message"]
    finally:
        bad.close()


async def test_silence_is_not_failure_while_the_replica_answers_probes() -> None:
    """A non-streaming answer silent past read_timeout_s arrives: no 5xx, no retry."""
    slow = FlakyServer("silent", silent_s=1.5)
    slow_url = await slow.start()
    cfg = replace(FAST_POLL, read_timeout_s=0.3)
    try:
        async with gateway([slow_url], replica_set=cfg) as (gw, client):
            r = await client.post("/v1/completions", json=completion())
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == "done"
            assert slow.posts == 1
            text = (await client.get("/metrics")).text
            assert metric(text, "strata_gateway_retries_total") == 0
            assert metric(text, "strata_gateway_upstream_errors_total", replica=slow_url) == 0
            # The operator's hard cap still cuts it: 504, not retried, not a fault.
            gw.replicas.replicas[slow_url].pool.request_timeout_s = 0.6
            r = await client.post("/v1/completions", json=completion())
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
            assert slow.posts == 2
            # A replica that stops answering probes too is known dead: the silence fails.
            gw.replicas.replicas[slow_url].pool.request_timeout_s = None
            slow.silent_s = 30
            slow.frozen = True
            t0 = time.monotonic()
            r = await client.post("/v1/completions", json=completion())
            assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
            assert time.monotonic() - t0 < 5 and slow.posts == 3
    finally:
        slow.close()


async def test_midstream_failure_ends_sse_with_an_error_event() -> None:
    bad = FlakyServer("midstream")
    bad_url = await bad.start()
    try:
        async with gateway([bad_url]) as (gw, client):
            r = await client.post("/v1/completions", json=completion(stream=True))
            assert r.status_code == 200
            events = [line for line in r.text.splitlines() if line.startswith("data: ")]
            assert json.loads(events[0][6:])["choices"][0]["text"] == "x"
            assert "mid-stream" in json.loads(events[-1][6:])["error"]["message"]
    finally:
        bad.close()


async def test_client_disconnect_cancels_the_upstream_request() -> None:
    backend = fake(ttft_ms=5, itl_ms=30, output_tokens=1000)
    async with serve(backend) as be, gateway([be]) as (gw, client):
        async with client.stream("POST", "/v1/completions",
                                 json=completion(max_tokens=1000, stream=True)) as resp:
            got = 0
            async for _ in resp.aiter_raw():
                got += 1
                if got == 3:
                    break
        # The gateway closed its upstream connection, so the replica stopped generating.
        await wait_for(lambda: backend._running._value.get() == 0, 3)
        await wait_for(lambda: gw.replicas.replicas[be].in_flight == 0, 3)
        text = (await client.get("/metrics")).text
        assert metric(text, "strata_gateway_client_disconnects_total") == 1
        sent = metric(generate_latest(backend.registry).decode(),
                      "strata_fake_output_tokens_total")
        assert 3 <= sent < 200  # far from the 1000 it would have produced


async def test_holds_requests_and_activates_a_tier_from_zero() -> None:
    calls: list[str] = []
    started: list[str] = []
    holder: dict[str, Gateway] = {}
    stack: list = []

    async def on_demand(tier: str) -> None:
        calls.append(tier)
        await asyncio.sleep(0.2)  # a replica takes a while to start
        cm = serve(fake())
        url = await cm.__aenter__()
        stack.append(cm)
        started.append(url)
        await holder["gw"].set_endpoints([url])

    try:
        async with gateway([], on_demand=on_demand, wait_ready=0) as (gw, client):
            holder["gw"] = gw
            health = await client.get("/health")
            assert health.status_code == 200 and health.json()["ready_replicas"] == 0
            rs = await asyncio.gather(*(client.post("/v1/completions", json=completion())
                                        for _ in range(3)))
            assert [r.status_code for r in rs] == [200, 200, 200]
            assert calls == ["engine"]  # one activation for the whole burst
            assert {r.headers["x-strata-replica"] for r in rs} == set(started)
            text = (await client.get("/metrics")).text
            assert metric(text, "strata_tier_replicas", tier="engine") == 1
    finally:
        for cm in stack:
            await cm.__aexit__(None, None, None)


async def test_hold_gives_up_with_503_after_the_bounded_wait() -> None:
    async def does_nothing(tier: str) -> None:
        return None

    async def fails(tier: str) -> None:
        raise RuntimeError("no capacity in tier")

    async with gateway([], on_demand=does_nothing, wait_ready=0,
                       proxy=ProxyConfig(hold_timeout_s=0.5)) as (gw, client):
        t0 = time.monotonic()
        r = await client.post("/v1/completions", json=completion())
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "no_ready_replica"
        assert 0.4 < time.monotonic() - t0 < 3
    async with gateway([], on_demand=fails, wait_ready=0,
                       proxy=ProxyConfig(hold_timeout_s=10)) as (gw, client):
        t0 = time.monotonic()
        r = await client.post("/v1/completions", json=completion())
        assert r.status_code == 503
        assert "no capacity in tier" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 5
    async with gateway([], wait_ready=0) as (gw, client):  # no activator: /health says so
        assert (await client.get("/health")).status_code == 503
