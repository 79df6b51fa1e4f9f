"""The engine's HTTP API with the real bundled model, through real clients."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


def load(url: str) -> dict:
    return httpx.get(f"{url}/load", timeout=5).json()


def wait_idle(url: str, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        rep = load(url)
        if rep["running"] == 0 and rep["waiting"] == 0 and rep["free_kv_blocks"] == rep["total_kv_blocks"]:
            return rep
        if time.monotonic() > deadline:
            raise AssertionError(f"replica not idle: {rep}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def client(engine_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine_url}/v1", api_key="unused", max_retries=0)


def test_models_and_health(engine_url: str, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{engine_url}/health").json() == {"status": "ok"}


def test_completion_non_streaming_usage_and_length(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_chat_streaming_with_usage_matches_non_streaming(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == whole.choices[0].message.content and text
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert finish == whole.choices[0].finish_reason


def test_n_logprobs_echo_and_token_prompts(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt=[504, 3575, 282], max_tokens=4, n=2, temperature=0.8, seed=3,
        logprobs=2, echo=True,
    )
    assert len(r.choices) == 2
    for c in r.choices:
        lp = c.logprobs
        # Echo with logprobs: 2 prompt tokens have logprobs (the first has none) + 4 generated.
        assert len(lp.tokens) == 2 + 4 and len(lp.token_logprobs) == 6
        assert all(v <= 0 for v in lp.token_logprobs)
        assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 8
    batch = client.completions.create(model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1]


def test_seed_and_stop(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt="List: one, two,", max_tokens=12, temperature=1.0, seed=11)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    r = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=30, temperature=0, stop=[","])
    assert r.choices[0].finish_reason == "stop" and "," not in r.choices[0].text
    assert r.choices[0].model_extra["stop_reason"] == ","


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
        logprobs=True, top_logprobs=3, temperature=0,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "invalid JSON"),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
        (json.dumps({"model": MODEL, "prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "does not exist"),
        (json.dumps({"model": MODEL, "prompt": "word " * 3000}).encode(), 400, "context length"),
        (json.dumps({"model": MODEL, "prompt": [10**9]}).encode(), 400, "vocabulary"),
        (json.dumps({"model": MODEL, "prompt": "x", "n": 2, "best_of": 3}).encode(), 400, "best_of"),
        (json.dumps({"model": MODEL, "prompt": "x", "bogus_field": 1}).encode(), 400, "bogus_field"),
        (json.dumps({"model": MODEL, "prompt": "x", "stream": True, "max_tokens": -5}).encode(), 400, "max_tokens"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_leaks_nothing(engine_url: str, body: bytes, status: int, needle: str) -> None:
    r = httpx.post(f"{engine_url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == status
    wait_idle(engine_url)


def test_bad_chat_input(engine_url: str) -> None:
    url = f"{engine_url}/v1/chat/completions"
    r = httpx.post(url, json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]


def test_client_disconnect_aborts_and_frees_kv(engine_url: str) -> None:
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{engine_url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        lines: list[str] = []
        # Hold the line iterator: a `for` over r.iter_lines() that breaks drops it, and
        # closing httpx's stream generators closes the connection at once — the server
        # then (rightly) aborts before the /load below, a race the client loses whenever a
        # token takes less time than a new connection's request (seen as a flaky test).
        chunks = r.iter_lines()
        for line in chunks:
            if line.startswith("data:"):
                assert "[DONE]" not in line
                lines.append(line)
            if len(lines) >= 3:
                break
        assert len(lines) == 3
        rep = load(engine_url)
        # The chunks in the message: if the sequence ended early they say how (an error chunk).
        assert rep["running"] + rep["waiting"] == 1, (rep, lines)
        chunks.close()  # now the client goes
    rep = wait_idle(engine_url)
    assert rep["free_kv_blocks"] == rep["total_kv_blocks"]


def test_non_streaming_disconnect_aborts(engine_url: str) -> None:
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{engine_url}/v1/completions", json=body, timeout=1.5)
    wait_idle(engine_url)


async def test_concurrent_requests_all_complete(engine_url: str) -> None:
    async with httpx.AsyncClient(base_url=engine_url, timeout=120) as c:
        async def one(i: int) -> dict:
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": f"Number {i} is", "max_tokens": 8, "ignore_eos": True})
            assert r.status_code == 200
            return r.json()
        results = await asyncio.gather(*(one(i) for i in range(12)))
    assert all(r["usage"]["completion_tokens"] == 8 for r in results)
    wait_idle(engine_url)


def test_metrics_exported(engine_url: str) -> None:
    text = httpx.get(f"{engine_url}/metrics").text
    for name in (
        "strata_num_requests_running", "strata_num_requests_waiting", "strata_kv_cache_usage_ratio",
        "strata_prefix_cache_hit_ratio", "strata_prompt_tokens_total", "strata_generation_tokens_total",
        "strata_time_to_first_token_seconds_bucket", "strata_time_per_output_token_seconds_bucket",
        "strata_e2e_request_latency_seconds_bucket",
    ):
        assert name in text, name
