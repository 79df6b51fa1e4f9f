"""A 3-stage pipeline of real processes on the bundled model, against a real single engine.

Head 0:10 (OpenAI API, scheduler) -> stage 10:20 -> stage 20:30 (head, sampling), hidden
states over the binary TCP transport. A second 20:30 replica joins by itself (scale-up),
sequences spread over both, it drains (scale-down) without losing anyone, and finally a
stage is killed: its clients get errors at once, never a hang. Every process holds the
cluster's internal token (`--internal-token-file`), so the links are authenticated and the
admin endpoints want the token.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
COMMON = ["--threads", "1", "--dtype", "float32"]
TOKEN = "integration-cluster-token"
ADMIN = {"x-strata-internal-token": TOKEN}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three fruits:",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage(model: Path, token_file: Path, layers: str, *args: str) -> tuple[subprocess.Popen, str]:
    port, data_port = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "strata.stages.cli", "--model", str(model), "--layers", layers,
           "--host", "127.0.0.1", "--port", str(port), "--data-port", str(data_port),
           "--internal-token-file", str(token_file), *COMMON, *args]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
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


def _until(cond, timeout_s: float = 30.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def pipeline(bundled_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    procs: list[subprocess.Popen] = []
    token_file = tmp_path_factory.mktemp("run") / "internal-token"
    token_file.write_text(TOKEN)
    try:
        w1, u1 = _stage(bundled_gguf, token_file, "10:20")
        w2, u2 = _stage(bundled_gguf, token_file, "20:30")
        procs += [w1, w2]
        head, hu = _stage(bundled_gguf, token_file, "0:10", "--stages", "0:10,10:20,20:30",
                          "--replica", u1, "--replica", u2, "--num-kv-blocks", "128",
                          "--max-model-len", "2048", "--step-timeout", "30")
        procs.append(head)
        for p, u in ((w1, u1), (w2, u2), (head, hu)):
            _wait_healthy(u, p)
        yield {"head": hu, "mid": (w1, u1), "tail": (w2, u2), "procs": procs,
               "model": bundled_gguf, "token_file": token_file}
    finally:
        for p in procs:
            _stop(p)


def _complete(base: str, prompt: str, max_tokens: int = 16) -> tuple[str, list[str]]:
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                             temperature=0, logprobs=0)
    return r.choices[0].text, list(r.choices[0].logprobs.tokens)


def _all(base: str) -> list[tuple[str, list[str]]]:
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        return list(ex.map(lambda p: _complete(base, p), PROMPTS))


@pytest.fixture(scope="module")
def reference(engine_url: str) -> list[tuple[str, list[str]]]:
    return [_complete(engine_url, p) for p in PROMPTS]


def test_three_stage_pipeline_equals_single_engine(pipeline, reference) -> None:  # type: ignore[no-untyped-def]
    head = pipeline["head"]
    assert _all(head) == reference
    c = openai.OpenAI(base_url=f"{head}/v1", api_key="x", max_retries=0, timeout=120)
    stream = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=16, temperature=0, stream=True,
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    whole = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=16, temperature=0,
    )
    assert text and text == whole.choices[0].message.content
    st = httpx.get(f"{head}/stages", timeout=5).json()
    assert [s["layers"] for s in st["stages"]] == ["10:20", "20:30"]
    assert st["head"]["timing"]["sent_bytes"] > 0
    load = httpx.get(f"{pipeline['mid'][1]}/load", timeout=5).json()
    assert load["stage"] == "10:20" and load["total_kv_blocks"] == 128


def test_replica_joins_takes_sequences_and_drains(pipeline, reference) -> None:  # type: ignore[no-untyped-def]
    head = pipeline["head"]
    extra, eu = _stage(pipeline["model"], pipeline["token_file"], "20:30", "--join", head)
    pipeline["procs"].append(extra)
    _wait_healthy(eu, extra)

    def tail_replicas() -> list[dict]:
        st = httpx.get(f"{head}/stages", timeout=5).json()
        return st["stages"][1]["replicas"]

    _until(lambda: len([r for r in tail_replicas() if r["state"] == "live"]) == 2, 60,
           "the joined replica")
    assert _all(head) == reference
    steps = {r["url"]: r["steps"] for r in tail_replicas()}
    assert steps[eu] > 0 and steps[pipeline["tail"][1]] > 0, steps
    # Scale down: the replica drains (the platform's POST /drain), the head stops using it.
    assert httpx.post(f"{eu}/drain", timeout=5).status_code == 401  # admin: the token only
    assert httpx.post(f"{eu}/drain", headers=ADMIN, timeout=5).status_code == 200
    _until(lambda: all(r["url"] != eu for r in tail_replicas()), 30, "the drained replica to leave")
    assert _until(lambda: httpx.get(f"{eu}/load", timeout=5).json()["running"] == 0, 30,
                  "the drained replica to be idle") is True
    before = httpx.get(f"{eu}/load", timeout=5).json()["steps"]
    assert _complete(head, PROMPTS[0]) == reference[0]
    assert httpx.get(f"{eu}/load", timeout=5).json()["steps"] == before
    _stop(extra)


def test_stage_death_fails_its_requests_cleanly(pipeline) -> None:  # type: ignore[no-untyped-def]
    head = pipeline["head"]
    mid_proc, _ = pipeline["mid"]
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    got_chunks = 0
    errors: list[dict] = []
    done = False
    t0 = time.monotonic()
    with httpx.stream(
        "POST", f"{head}/v1/completions", json=body, timeout=httpx.Timeout(30.0)
    ) as r:
        assert r.status_code == 200
        try:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        errors.append(event["error"])
                        continue
                    got_chunks += 1
                    if got_chunks == 3:
                        mid_proc.send_signal(signal.SIGKILL)
                elif line.strip() == "data: [DONE]":
                    done = True
        except httpx.HTTPError:
            errors.append({"type": "connection broken"})
    assert got_chunks >= 3
    # The stream ends with an OpenAI-format error event (or a broken connection), never [DONE].
    assert errors and not done
    assert time.monotonic() - t0 < 25, "the client waited for a dead stage"
    # New requests fail fast with an OpenAI-format 503; the head reports it cannot serve.
    r = httpx.post(f"{head}/v1/completions", json={**body, "stream": False, "max_tokens": 4},
                   timeout=30)
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailable"
    assert "10:20" in r.json()["error"]["message"]
    assert httpx.get(f"{head}/health", timeout=5).status_code == 503
