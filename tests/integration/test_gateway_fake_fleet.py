"""`strata gateway` as a process in front of fake OpenAI backend processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

GATEWAY = [sys.executable, "-m", "strata.gateway.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ok(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def procs() -> Iterator[Callable[..., tuple[subprocess.Popen, str]]]:
    """Start fake backends ("fake", args) or gateways ("gateway", args); all stop at the end."""
    started: list[subprocess.Popen] = []

    def start(kind: str, *args: str, env: dict[str, str] | None = None
              ) -> tuple[subprocess.Popen, str]:
        port = _free_port()
        cmd = ([sys.executable, "-m", "strata.bench.fake_backend"] if kind == "fake"
               else GATEWAY) + ["--port", str(port), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        _wait_ok(url + "/health", proc)
        return proc, url

    yield start
    for proc in started:
        _stop(proc)


def test_openai_client_streams_through_the_gateway_process(procs) -> None:
    _, a = procs("fake", "--ttft-ms", "5", "--itl-ms", "2")
    _, b = procs("fake", "--ttft-ms", "5", "--itl-ms", "2")
    _, gw = procs("gateway", "--replica", a, "--replica", b, "--policy", "round_robin")
    client = openai.OpenAI(base_url=gw + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["strata-fake"]
    stream = client.chat.completions.create(
        model="strata-fake", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        usage = chunk.usage or usage
        text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == " t0 t1 t2 t3 t4"
    assert usage is not None and usage.completion_tokens == 5
    seen = {client.completions.with_raw_response.create(
        model="strata-fake", prompt="x", max_tokens=2).headers["x-strata-replica"]
        for _ in range(4)}
    assert seen == {a, b}


def test_replica_killed_before_its_first_token_is_not_run_twice(procs) -> None:
    """A request that reached a replica gets a 502 when it dies, never a second run."""
    slow_a, a = procs("fake", "--ttft-ms", "1500")
    _, b = procs("fake", "--ttft-ms", "1500")
    _, gw = procs("gateway", "--replica", a, "--replica", b, "--policy", "round_robin",
                  "--health-interval-s", "30")
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(httpx.post(gw + "/v1/completions", timeout=30, json={
            "model": "strata-fake", "prompt": "x", "max_tokens": 3, "stream": True}))

    # Round robin alternates; send until a request is in flight on a, then kill a.
    for _ in range(2):
        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.4)
        running = httpx.get(a + "/metrics").text
        if "strata_fake_requests_running 1.0" in running:
            os.kill(slow_a.pid, signal.SIGKILL)
            t.join(30)
            break
        t.join(30)
    else:
        pytest.fail("no request reached replica a")
    resp = results[-1]
    assert resp.status_code == 502
    metrics = httpx.get(gw + "/metrics").text
    assert "strata_gateway_retries_total 0.0" in metrics
    # The dead replica is taken out (its refusals are never-started: retried at most once).
    for _ in range(3):
        r = httpx.post(gw + "/v1/completions", timeout=30,
                       json={"model": "strata-fake", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and r.headers["x-strata-replica"] == b
    metrics = httpx.get(gw + "/metrics").text
    assert "strata_gateway_retries_total 0.0" in metrics or \
        "strata_gateway_retries_total 1.0" in metrics


def test_api_keys_from_the_environment_and_rate_limits(procs) -> None:
    _, a = procs("fake")
    _, gw = procs("gateway", "--replica", a, "--rate-limit-rpm", "2",
                  env={"STRATA_API_KEYS": "sk-one,sk-two"})
    body = {"model": "strata-fake", "prompt": "x", "max_tokens": 1}
    assert httpx.post(gw + "/v1/completions", json=body).status_code == 401
    one = {"Authorization": "Bearer sk-one"}
    codes = [httpx.post(gw + "/v1/completions", json=body, headers=one).status_code
             for _ in range(3)]
    assert codes == [200, 200, 429]
    two = {"Authorization": "Bearer sk-two"}
    assert httpx.post(gw + "/v1/completions", json=body, headers=two).status_code == 200
