"""Two gateways over the same two real engines route as one: same caches, same loads.

Neither gateway sees the other's requests. What they share is what the engines report:
their load (/load) and the routing keys their prefix caches hold (/internal/prefix). With
those, a prefix group sent alternately through gateway A and gateway B stays on one
replica, and a replica that one gateway is filling is avoided by the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import free_port, stop, wait_healthy

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MAX_NUM_SEQS = 2
ENGINE_ARGS = ["--threads", "1", "--dtype", "float32", "--num-kv-blocks", "256",
               "--max-model-len", "2048", "--max-num-seqs", str(MAX_NUM_SEQS)]
TOKEN = "test-internal-token-of-this-cluster"  # noqa: S105 - a test value, not a secret
GROUPS = 6
PER_GROUP = 6


def _start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "STRATA_INTERNAL_TOKEN": TOKEN}
    proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def fleet(bundled_gguf: Path) -> Iterator[tuple[list[str], list[str]]]:
    """Two engines and two gateways, each gateway listing both engines; one cluster token."""
    procs: list[subprocess.Popen] = []
    try:
        engines = []
        for _ in range(2):
            proc, url = _start([sys.executable, "-m", "strata.cli", "engine", "--model",
                                str(bundled_gguf), *ENGINE_ARGS])
            procs.append(proc)
            engines.append(url)
        for proc, url in zip(procs, engines, strict=True):
            wait_healthy(url, proc)
        replicas = sum((["--replica", u] for u in engines), [])
        gateways = []
        for _ in range(2):
            proc, url = _start([sys.executable, "-m", "strata.gateway.cli", *replicas])
            procs.append(proc)
            gateways.append(url)
            wait_healthy(url, proc, 60)
        time.sleep(0.5)  # both gateways have read both engines' loads
        yield engines, gateways
    finally:
        for proc in procs:
            stop(proc)


def _prefix(group: int) -> str:
    # ~900 bytes: three full 256-byte routing chunks shared by the group
    return f"Case file {group}. " + f"The archive of district {group} lists every permit. " * 18


def _complete(gateway: str, prompt: str, max_tokens: int = 1) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    resp = httpx.post(gateway + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.headers["x-strata-replica"]


def test_the_prefix_report_wants_the_internal_token(fleet) -> None:
    engines, _ = fleet
    assert httpx.get(engines[0] + "/internal/prefix").status_code == 401
    resp = httpx.get(engines[0] + "/internal/prefix", headers={"x-strata-internal-token": TOKEN})
    assert resp.status_code == 200 and resp.json()["full"] is True


def test_two_gateways_send_a_prefix_group_to_the_same_replica(fleet) -> None:
    engines, (a, b) = fleet
    gateways = [a, b]
    home: dict[int, str] = {}
    # The first request of each group, alternately through A and B, places the group.
    for g in range(GROUPS):
        home[g] = _complete(gateways[g % 2], _prefix(g) + " Question 0?")
    assert set(home.values()) == set(engines)  # the groups are spread, not piled on one
    time.sleep(0.5)  # a few polls: both gateways have read what the engines now hold
    placed: dict[tuple[int, str], Counter[str]] = {}
    agree = total = 0
    for i in range(1, PER_GROUP):
        for g in range(GROUPS):
            via = gateways[(g + i) % 2]  # alternate: each group goes through both gateways
            served = _complete(via, _prefix(g) + f" Question {i}?")
            placed.setdefault((g, via), Counter())[served] += 1
            agree += served == home[g]
            total += 1
    assert agree / total >= 0.95, (agree, total, placed)
    for g in range(GROUPS):  # per group, both gateways' choice is the same replica
        assert placed[g, a].most_common(1)[0][0] == placed[g, b].most_common(1)[0][0] == home[g]


def test_a_gateway_avoids_the_replica_the_other_one_is_filling(fleet) -> None:
    engines, (a, b) = fleet
    hot = _complete(a, _prefix(100) + " Start.")
    time.sleep(0.5)
    stop_streams = threading.Event()
    filled: list[str] = []

    def long_stream() -> None:
        body = {"model": MODEL, "prompt": _prefix(100) + " Tell a long story.",
                "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", a + "/v1/completions", json=body, timeout=120) as resp:
            filled.append(resp.headers["x-strata-replica"])
            for _ in resp.iter_raw():
                if stop_streams.is_set():
                    break

    threads = [threading.Thread(target=long_stream) for _ in range(MAX_NUM_SEQS)]
    try:
        for t in threads:
            t.start()
            time.sleep(0.3)
        deadline = time.monotonic() + 30
        while (len(filled) < MAX_NUM_SEQS
               or httpx.get(hot + "/load").json()["running"] < MAX_NUM_SEQS):
            assert time.monotonic() < deadline, "gateway A did not fill the hot replica"
            time.sleep(0.05)
        assert filled == [hot] * MAX_NUM_SEQS  # A put its hot group where its cache is
        time.sleep(0.5)  # B has polled the engines since
        other = next(u for u in engines if u != hot)
        # B has sent nothing there itself: only the engines' reports tell it the hot replica
        # is full, so its requests, even of the hot group, go to the other one.
        served = [_complete(b, _prefix(200 + i) + " New topic.") for i in range(2)]
        served.append(_complete(b, _prefix(100) + " Another question?"))
        assert served == [other] * 3, served
    finally:
        stop_streams.set()
        for t in threads:
            t.join(60)
