"""Hostile requests against a real `strata engine` process (tiny random-weight model) behind a
real gateway process: each is a 4xx in OpenAI's error format, and afterwards the replica is
the same process, still answers a normal request, and holds no KV block."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from tests.integration.conftest import free_port, start_engine, stop, wait_healthy

NORMAL = {"prompt": "Hello there", "max_tokens": 3, "temperature": 0}
CHAT = [{"role": "user", "content": "hi"}]

# (name, path, raw body, expected status); raw bytes so that what Python's json would
# never write (NaN, lone surrogates, 2**64) reaches the servers as a client could send it.
HOSTILE: list[tuple[str, str, bytes, int]] = [
    ("seed past uint64", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 4, "seed": 18446744073709551616}', 400),
    ("seed past int64", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 4, "seed": 9223372036854775808}', 400),
    ("top_k past int64", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 4, "top_k": 9223372036854775808, "temperature": 1}', 400),
    ("n huge", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "n": 1000000}', 400),
    ("prompts x n over the cap", "/v1/completions",
     json.dumps({"prompt": ["a"] * 40, "max_tokens": 2, "n": 100}).encode(), 400),
    ("best_of huge", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 2, "best_of": 99999999999999999999}', 400),
    ("logprobs too many", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "logprobs": 21}', 400),
    ("top_logprobs huge", "/v1/chat/completions",
     json.dumps({"messages": CHAT, "max_tokens": 2, "logprobs": True,
                 "top_logprobs": 2**40}).encode(), 400),
    ("max_tokens past int64", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 99999999999999999999}', 400),
    ("max_tokens past the context", "/v1/completions", b'{"prompt": "hi", "max_tokens": 100000}', 400),
    ("max_tokens a string", "/v1/completions", b'{"prompt": "hi", "max_tokens": "4"}', 400),
    ("penalty out of range", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 2, "presence_penalty": 1e308}', 400),
    ("NaN literal", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}', 400),
    ("Infinity literal", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "top_p": Infinity}', 400),
    ("float overflow to inf", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 2, "temperature": 1e400}', 400),
    ("logit_bias id outside the vocabulary", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"999999999": 5}}', 400),
    ("logit_bias key past int64", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"99999999999999999999999": 5}}', 400),
    ("logit_bias value out of range", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": 1000}}', 400),
    ("logit_bias too many", "/v1/completions",
     json.dumps({"prompt": "hi", "max_tokens": 2,
                 "logit_bias": {str(i): 1 for i in range(1000)}}).encode(), 400),
    ("stop_token_ids outside the vocabulary", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 2, "stop_token_ids": [4294967296]}', 400),
    ("stop list huge", "/v1/completions",
     json.dumps({"prompt": "hi", "max_tokens": 2, "stop": ["x"] * 10000}).encode(), 400),
    ("token prompt out of vocabulary", "/v1/completions",
     b'{"prompt": [1, 2, 999999], "max_tokens": 2}', 400),
    ("token prompt with a bool", "/v1/completions", b'{"prompt": [1, true], "max_tokens": 2}', 400),
    ("token prompt negative", "/v1/completions", b'{"prompt": [[1], [-1]], "max_tokens": 2}', 400),
    ("token prompt past int64", "/v1/completions",
     b'{"prompt": [18446744073709551616], "max_tokens": 2}', 400),
    ("lone surrogate in a prompt", "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', 400),
    ("lone surrogate in a message", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 2}', 400),
    ("lone surrogate in a key", "/v1/completions", b'{"prompt": "hi", "\\ud800": 1}', 400),
    ("deep nesting", "/v1/completions",
     b'{"prompt": "hi", "response_format": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}", 400),
    ("deep array nesting", "/v1/completions",
     b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    ("a 5000-digit number", "/v1/completions", b'{"prompt": "hi", "n": 1' + b"0" * 5000 + b"}", 400),
    ("not JSON", "/v1/completions", b"{prompt: hi}", 400),
    ("not an object", "/v1/completions", b"[1, 2, 3]", 400),
    ("template kwargs: messages", "/v1/chat/completions",
     json.dumps({"messages": CHAT, "max_tokens": 2,
                 "chat_template_kwargs": {"messages": []}}).encode(), 400),
    ("template kwargs: self", "/v1/chat/completions",
     json.dumps({"messages": CHAT, "max_tokens": 2,
                 "chat_template_kwargs": {"self": 1}}).encode(), 400),
    ("template kwargs: both switches", "/v1/chat/completions",
     json.dumps({"messages": CHAT, "max_tokens": 2,
                 "chat_template_kwargs": {"continue_final_message": True}}).encode(), 400),
    ("content part of the wrong type", "/v1/chat/completions",
     json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}],
                 "max_tokens": 2}).encode(), 400),
    ("role unknown", "/v1/chat/completions",
     json.dumps({"messages": [{"role": "root", "content": "x"}]}).encode(), 400),
    ("messages empty", "/v1/chat/completions", json.dumps({"messages": []}).encode(), 400),
    ("body over the limit", "/v1/completions",
     b'{"prompt": "' + b"a" * (9 << 20) + b'"}', 413),
]


def _start_gateway(engine_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "strata.gateway.cli", "--replica", engine_url, "--host",
         "127.0.0.1", "--port", str(port), "--poll-interval-s", "0.1", "--max-retries", "0"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 60)
    except BaseException:
        stop(proc)
        raise
    return proc, url


@pytest.fixture(scope="module")
def servers(tiny_hf_dir: Path) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """(engine process, engine URL, gateway URL)."""
    engine, engine_url = start_engine(tiny_hf_dir, "--num-kv-blocks", "64", "--max-model-len", "256")
    try:
        gateway, gateway_url = _start_gateway(engine_url)
    except BaseException:
        stop(engine)
        raise
    yield engine, engine_url, gateway_url
    stop(gateway)
    stop(engine)


def _wait_idle(engine_url: str, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        rep = httpx.get(f"{engine_url}/load", timeout=5).json()
        if rep["running"] == 0 and rep["waiting"] == 0 and \
                rep["free_kv_blocks"] == rep["total_kv_blocks"]:
            return rep
        assert time.monotonic() < deadline, f"KV blocks leaked or sequences left: {rep}"
        time.sleep(0.05)


@pytest.mark.parametrize("via", ["engine", "gateway"])
def test_hostile_bodies_are_4xx_and_the_replica_lives(servers, via: str) -> None:
    engine, engine_url, gateway_url = servers
    base = engine_url if via == "engine" else gateway_url
    pid = engine.pid
    with httpx.Client(base_url=base, timeout=30) as client:
        for name, path, body, status in HOSTILE:
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param", "code"}, name
            assert err["message"], name
            assert engine.poll() is None, f"{name} killed the replica"
        # The same process still serves, and nothing is held.
        ok = client.post("/v1/completions", json=NORMAL)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
        chat = client.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 2,
            "chat_template_kwargs": {"add_generation_prompt": True}})
        assert chat.status_code == 200, chat.text
    assert engine.pid == pid and engine.poll() is None
    assert httpx.get(f"{engine_url}/health").json() == {"status": "ok"}
    _wait_idle(engine_url)


def test_errors_name_the_field(servers) -> None:
    _, engine_url, gateway_url = servers
    for base in (engine_url, gateway_url):
        r = httpx.post(f"{base}/v1/completions", timeout=30,
                       content=b'{"prompt": "hi", "max_tokens": 4, "seed": 18446744073709551616}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
        r = httpx.post(f"{base}/v1/completions", timeout=30,
                       json={"prompt": "hi", "max_tokens": 2, "logit_bias": {"999999": 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_extreme_but_valid_values_are_served(servers) -> None:
    _, engine_url, gateway_url = servers
    body = {"prompt": "hi", "max_tokens": 3, "seed": 2**63 - 1, "top_k": 2**31 - 1,
            "temperature": 1.5, "n": 2, "logit_bias": {"0": -100, "5": 100}, "stop": ["x"] * 64,
            "repetition_penalty": 1e6, "stop_token_ids": [0]}
    for base in (engine_url, gateway_url):
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2
    _wait_idle(engine_url)


def test_a_streamed_hostile_request_fails_before_the_stream(servers) -> None:
    _, engine_url, _ = servers
    r = httpx.post(f"{engine_url}/v1/completions", timeout=30, json={
        "prompt": [1, 2, 10**7], "max_tokens": 2, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    _wait_idle(engine_url)


def test_body_size_is_checked_while_reading(servers) -> None:
    """A chunked body with no length gets its 413 while the client is still sending: the
    server counted as it read, rather than reading the whole body first."""
    _, engine_url, _ = servers
    host, port = engine_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        mib = b"a" * (1 << 20)
        for _ in range(9):  # 9 MiB, past the 8 MiB limit; the final chunk is never sent
            sock.sendall(b"%x\r\n%s\r\n" % (len(mib), mib))
        head = b""
        while b"}}" not in head and (chunk := sock.recv(4096)):
            head += chunk
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"body_too_large" in head
    assert httpx.get(f"{engine_url}/health").json() == {"status": "ok"}


def test_openapi_documents_describe_the_request_bodies(servers) -> None:
    _, engine_url, gateway_url = servers
    for base in (engine_url, gateway_url):
        doc = httpx.get(f"{base}/openapi.json", timeout=10).json()
        op = doc["paths"]["/v1/completions"]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        name = ref.rsplit("/", 1)[1]
        assert doc["components"]["schemas"][name]["properties"]["seed"]


def _load_fuzz() -> ModuleType:
    """benchmarks/fuzz.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("_bench_fuzz", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def test_a_short_schemathesis_fuzz_finds_no_5xx(servers) -> None:
    """A few hundred schemathesis cases on each schema (the full run: benchmarks/fuzz.py)."""
    pytest.importorskip("schemathesis")
    fuzz = _load_fuzz()
    engine, engine_url, gateway_url = servers
    for name, url in (("engine", engine_url), ("gateway", gateway_url)):
        result = fuzz.fuzz_target(name, url, 120, 7, engine)
        assert result.cases >= 100, result.per_operation
        assert not result.server_errors, result.server_errors[:3]
        assert not result.transport_errors, result.transport_errors[:3]
        assert any(k.startswith("2") for k in result.statuses), result.statuses
    assert engine.poll() is None
    _wait_idle(engine_url, 60)
