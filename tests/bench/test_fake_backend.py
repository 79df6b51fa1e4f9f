"""The fake backend fixture speaks enough OpenAI for the bench, the gateway and guidellm."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx


def _events(response: httpx.Response) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_completions_stream_timing_usage_and_ignore_eos(fake_backend: Callable[..., str]) -> None:
    url = fake_backend("--ttft-ms", "100", "--itl-ms", "20", "--output-tokens", "3")
    body = {"prompt": [1, 2, 3, 4], "max_tokens": 10, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as resp:
        assert resp.status_code == 200
        events = _events(resp)
    elapsed = time.perf_counter() - start
    texts = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert len(texts) == 10 and events[-1]["usage"]["prompt_tokens"] == 4
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert 0.1 + 9 * 0.02 <= elapsed < 2.0
    # Without ignore_eos the natural length (3) wins and the reason is "stop".
    plain = httpx.post(url + "/v1/completions", json={"prompt": "a b", "max_tokens": 10})
    choice = plain.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and plain.json()["usage"]["completion_tokens"] == 3


def test_chat_no_ignore_eos_metrics_and_errors(fake_backend: Callable[..., str]) -> None:
    url = fake_backend("--ttft-ms", "0", "--itl-ms", "0", "--output-tokens", "2",
                       "--no-ignore-eos", "--tier", "decode")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as resp:
        events = _events(resp)
    content = [e["choices"][0]["delta"].get("content") for e in events]
    assert content == ["", " t0", " t1", None]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    metrics = httpx.get(url + "/metrics").text
    assert 'strata_tier_replicas{tier="decode"} 1.0' in metrics
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "strata-fake"
    bad = httpx.post(url + "/v1/completions", json={"max_tokens": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    assert httpx.get(url + "/nowhere").json()["error"]["code"] == "not_found"
