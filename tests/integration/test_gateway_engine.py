"""The gateway in front of real `strata engine` processes serving the bundled model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
ENGINE_ARGS = ["--threads", "1", "--dtype", "float32", "--num-kv-blocks", "256",
               "--max-model-len", "2048"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy in {timeout_s} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _engines(model: Path, n: int) -> tuple[list[subprocess.Popen], list[str]]:
    started = [_start([sys.executable, "-m", "strata.cli", "engine", "--model", str(model),
                       *ENGINE_ARGS]) for _ in range(n)]
    procs, urls = [p for p, _ in started], [u for _, u in started]
    try:
        for p, u in started:
            _wait_healthy(u, p)
    except BaseException:
        for p in procs:
            _stop(p)
        raise
    return procs, urls


def _gateway(*args: str) -> tuple[subprocess.Popen, str]:
    proc, url = _start([sys.executable, "-m", "strata.gateway.cli", *args])
    _wait_healthy(url, proc, 60)
    return proc, url


def _load(url: str) -> dict:
    return httpx.get(url + "/load", timeout=5).json()


def _wait_idle(url: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        rep = _load(url)
        if rep["running"] == 0 and rep["waiting"] == 0 \
                and rep["free_kv_blocks"] == rep["total_kv_blocks"]:
            return rep
        assert time.monotonic() < deadline, f"replica not idle: {rep}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def engines(bundled_gguf: Path) -> Iterator[list[str]]:
    """Two engine processes on the bundled model."""
    procs, urls = _engines(bundled_gguf, 2)
    yield urls
    for p in procs:
        _stop(p)


@pytest.fixture(scope="module")
def gateway(engines: list[str]) -> Iterator[str]:
    proc, url = _gateway(*sum((["--replica", u] for u in engines), []),
                         "--poll-interval-s", "0.1")
    yield url
    _stop(proc)


def test_streaming_chat_through_the_gateway_matches_the_engine(engines, gateway) -> None:
    msgs = [{"role": "user", "content": "Name three colors."}]
    direct = openai.OpenAI(base_url=engines[0] + "/v1", api_key="x", max_retries=0)
    via = openai.OpenAI(base_url=gateway + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in via.models.list().data] == [MODEL]
    whole = direct.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16,
                                           temperature=0)
    stream = via.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        usage = chunk.usage or usage
        text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == whole.choices[0].message.content and text
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_gateway_reads_engine_load_reports(engines, gateway) -> None:
    via = openai.OpenAI(base_url=gateway + "/v1", api_key="x", max_retries=0)
    for _ in range(4):
        via.completions.create(model=MODEL, prompt="Hello there", max_tokens=2)
    text = httpx.get(gateway + "/metrics").text
    routed = [line for line in text.splitlines()
              if line.startswith("strata_gateway_requests_routed_total")]
    assert len(routed) >= 1 and all('policy="resource_match"' in line for line in routed)
    assert 'strata_tier_replicas{tier="engine"} 2.0' in text


def test_client_disconnect_frees_the_engines_kv_blocks(engines, gateway) -> None:
    before = {u: _wait_idle(u)["total_kv_blocks"] for u in engines}
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", gateway + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        served = resp.headers["x-strata-replica"]
        chunks = 0
        for _ in resp.iter_raw():
            chunks += 1
            if chunks == 3:
                during = _load(served)
                break
    # While the stream was open the engine held KV blocks for it ...
    assert during["running"] == 1 and during["free_kv_blocks"] < during["total_kv_blocks"]
    # ... and closing the client connection made the gateway cancel it there.
    rep = _wait_idle(served, 30)
    assert rep["free_kv_blocks"] == rep["total_kv_blocks"] == before[served]


def test_rate_limit_with_real_engines(engines) -> None:
    proc, gw = _gateway("--replica", engines[0], "--rate-limit-rpm", "2")
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        codes = [httpx.post(gw + "/v1/completions", json=body, timeout=60).status_code
                 for _ in range(3)]
        assert codes == [200, 200, 429]
    finally:
        _stop(proc)


def test_engine_killed_before_its_first_token_is_not_run_twice(bundled_gguf, engines) -> None:
    """The request had reached the engine: a 502, never a second run on the survivor."""
    procs, (victim,) = _engines(bundled_gguf, 1)
    survivor = engines[1]
    gw_proc, gw = _gateway("--replica", victim, "--replica", survivor, "--policy",
                           "round_robin", "--health-interval-s", "30")
    prompt = "The history of the city goes back a long way. " * 120  # ~1200 tokens to prefill
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": True}
    results: list[httpx.Response] = []
    try:
        for _ in range(2):  # round robin: one of two consecutive requests lands on the victim
            t = threading.Thread(target=lambda: results.append(
                httpx.post(gw + "/v1/completions", json=body, timeout=300)))
            t.start()
            deadline = time.monotonic() + 20
            hit = False
            while time.monotonic() < deadline and t.is_alive():
                rep = _load(victim)
                if rep["running"] or rep["waiting"]:
                    hit = True
                    os.kill(procs[0].pid, signal.SIGKILL)
                    break
                time.sleep(0.01)
            t.join(300)
            if hit:
                break
        else:
            pytest.fail("no request reached the victim engine")
        resp = results[-1]
        assert resp.status_code == 502, resp.text
        assert resp.json()["error"]["code"] == "upstream_error"
        assert "strata_gateway_retries_total 0.0" in httpx.get(gw + "/metrics").text
        # The dead engine refuses connections now: the next request moves, never started.
        resp = httpx.post(gw + "/v1/completions", json={**body, "prompt": "Hi"}, timeout=300)
        assert resp.status_code == 200 and resp.headers["x-strata-replica"] == survivor
    finally:
        _stop(gw_proc)
        for p in procs:
            _stop(p)
