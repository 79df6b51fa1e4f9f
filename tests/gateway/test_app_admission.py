"""Admission at the gateway: keys, rate limits, body and queue bounds, request errors."""

from __future__ import annotations

import asyncio

import pytest

from strata.gateway.auth import ApiKeys
from strata.gateway.ratelimit import Limits

from .servers import completion, fake, gateway, metric, serve


def assert_openai_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    return err


async def test_api_keys_guard_generation_and_models_not_health() -> None:
    keys = ApiKeys.parse("sk-good name=alice")
    async with serve(fake()) as be, gateway([be], api_keys=keys) as (gw, client):
        assert_openai_error(await client.post("/v1/completions", json=completion()), 401,
                            "invalid_api_key")
        bad = {"Authorization": "Bearer sk-bad"}
        assert_openai_error(await client.post("/v1/completions", json=completion(),
                                              headers=bad), 401)
        good = {"Authorization": "Bearer sk-good"}
        assert (await client.post("/v1/completions", json=completion(),
                                  headers=good)).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/v1/models", headers=good)).status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert "sk-good" not in (await client.get("/metrics")).text


async def test_per_key_limits_answer_429_with_retry_after() -> None:
    keys = ApiKeys.parse("sk-a name=a rpm=2\nsk-b name=b")
    async with serve(fake()) as be, gateway([be], api_keys=keys,
                                            default_limits=Limits(tpm=100)) as (gw, client):
        a = {"Authorization": "Bearer sk-a"}
        b = {"Authorization": "Bearer sk-b"}
        for _ in range(2):
            assert (await client.post("/v1/completions", json=completion(),
                                      headers=a)).status_code == 200
        r = await client.post("/v1/completions", json=completion(), headers=a)
        err = assert_openai_error(r, 429, "rate_limit_exceeded")
        assert err["type"] == "requests"
        assert 1 <= int(r.headers["retry-after"]) <= 30
        # b has no rpm of its own but the default 100 tokens/min: 3 + 40 tokens each.
        for _ in range(2):
            assert (await client.post("/v1/completions", json=completion(max_tokens=40),
                                      headers=b)).status_code == 200
        r = await client.post("/v1/completions", json=completion(max_tokens=40), headers=b)
        assert assert_openai_error(r, 429)["type"] == "tokens"
        huge = await client.post("/v1/completions", json=completion(max_tokens=500),
                                 headers=b)
        assert_openai_error(huge, 400, "exceeds_token_limit")
        text = (await client.get("/metrics")).text
        assert metric(text, "strata_gateway_rejected_total", reason="rate_limit_exceeded") == 2


async def test_limits_by_client_address_without_keys() -> None:
    async with serve(fake()) as be, gateway([be], default_limits=Limits(rpm=1)) as (gw, c):
        assert (await c.post("/v1/completions", json=completion())).status_code == 200
        assert (await c.post("/v1/completions", json=completion())).status_code == 429


async def test_bounded_queue_per_model_answers_503_when_full() -> None:
    async with serve(fake(ttft_ms=300)) as be, gateway(
            [be], max_in_flight_per_model=1, max_queued_per_model=1) as (gw, client):
        rs = await asyncio.gather(*(client.post("/v1/completions", json=completion())
                                    for _ in range(3)))
        codes = sorted(r.status_code for r in rs)
        assert codes == [200, 200, 503]
        full = next(r for r in rs if r.status_code == 503)
        assert_openai_error(full, 503, "queue_full")
        assert full.headers["retry-after"] == "1"


async def test_queue_wait_is_bounded() -> None:
    async with serve(fake(ttft_ms=600)) as be, gateway(
            [be], max_in_flight_per_model=1, queue_timeout_s=0.1) as (gw, client):
        rs = await asyncio.gather(*(client.post("/v1/completions", json=completion())
                                    for _ in range(2)))
        assert sorted(r.status_code for r in rs) == [200, 503]
        assert_openai_error(next(r for r in rs if r.status_code == 503), 503, "queue_timeout")


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "strata-fake", "prompt": 5}', 400, "prompt"),
    (b'{"model": "strata-fake", "prompt": "x", "max_tokens": -3}', 400, "max_tokens"),
    (b'{"model": "other", "prompt": "x"}', 404, "model"),
])
async def test_bad_requests_get_openai_errors(body: bytes, status: int, param) -> None:
    async with serve(fake()) as be, gateway([be]) as (gw, client):
        r = await client.post("/v1/completions", content=body,
                              headers={"content-type": "application/json"})
        assert assert_openai_error(r, status)["param"] == param


async def test_body_size_limit_and_method() -> None:
    async with serve(fake()) as be, gateway([be], max_body_bytes=2048) as (gw, client):
        r = await client.post("/v1/completions", json=completion(prompt="x" * 5000))
        assert_openai_error(r, 413, "body_too_large")
        assert (await client.get("/v1/completions")).status_code == 405

        async def chunked():  # no Content-Length: counted while it arrives
            for _ in range(3):
                yield b"x" * 1500

        r = await client.post("/v1/completions", content=chunked(),
                              headers={"content-type": "application/json"})
        assert_openai_error(r, 413, "body_too_large")
        assert "2048 bytes" in r.json()["error"]["message"]


async def test_prompt_too_large_for_every_kv_cache_is_rejected() -> None:
    from .servers import LoadBackend, report

    backend = LoadBackend(report(total_kv_blocks=10, free_kv_blocks=10, block_size=16))
    async with serve(backend) as be, gateway([be]) as (gw, client):
        await asyncio.sleep(0.2)  # first /load poll
        assert gw.replicas.replicas[be].load is not None
        r = await client.post("/v1/completions", json=completion(prompt="y" * 4000))
        assert_openai_error(r, 400)
        assert "KV cache" in r.json()["error"]["message"]
        assert backend.requests == 0
