"""kill -9 of an engine replica mid-stream, behind the real gateway of ``strata serve``.

Two tiny-model replicas serve long streams; one replica is killed while streams run on
it. Every stream must end within a bound (none hangs): those on the killed replica with
an SSE error event in the OpenAI error format, the others with ``[DONE]``. New requests
succeed meanwhile (the survivor, or the gateway's retry before the first byte), and the
platform restarts the killed replica under the same id. benchmarks/faults.py measures the
same fault (and the stage, head and gateway kills) under a longer load.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from strata.platform.process import free_port
from tests.integration.cluster_helpers import (
    alive,
    complete,
    start_cluster,
    stop_cluster,
    tier,
    wait_for,
)

pytestmark = pytest.mark.slow

STREAMS = 6
HANG_BOUND_S = 60.0  # far above a stream's normal length: reaching it means "hung"


@pytest.fixture
def cluster(tiny_hf_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    config = {
        "model": {"path": str(tiny_hf_dir), "served_model_name": "tiny"},
        "engine": {"dtype": "float32", "kv_cache": "16MiB", "threads": 1, "max_num_seqs": 8},
        "tiers": {"engine": {"replicas": 2}},
        "gateway": {"port": free_port(), "health_interval_s": 0.5},
        "platform": {"log_dir": str(tmp_path / "replicas"), "restart_backoff_s": 0.5,
                     "health_interval_s": 0.2},
    }
    proc, url = start_cluster(config, tmp_path)
    try:
        yield proc, url
    finally:
        code = stop_cluster(proc)
        print((tmp_path / "cluster.log").read_text()[-4000:])
    assert code == 0


class _Stream(threading.Thread):
    """One long streamed completion; records its replica, chunks and how it ended."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.replica: str | None = None
        self.chunks = 0
        self.ending: str | None = None  # done | error | broken
        self.error: dict[str, Any] | None = None
        self.started = threading.Event()

    def run(self) -> None:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1500, "ignore_eos": True,
                "stream": True, "temperature": 0}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body,
                              timeout=HANG_BOUND_S) as resp:
                self.replica = resp.headers.get("x-strata-replica")
                for line in resp.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.ending = "done"
                        return
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.ending, self.error = "error", event["error"]
                        return
                    self.chunks += 1
                    if self.chunks == 2:
                        self.started.set()
            self.ending = "broken"  # closed without [DONE] or an error event
        except httpx.HTTPError as err:
            self.ending, self.error = "broken", {"message": repr(err)}
        finally:
            self.started.set()


def test_a_replica_killed_mid_stream_ends_every_stream_and_comes_back(
        cluster: tuple[subprocess.Popen, str]) -> None:
    _, url = cluster
    wait_for(lambda: tier(url)["ready"] == 2, 120, "two ready replicas")
    streams = [_Stream(url) for _ in range(STREAMS)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(60), "a stream did not start"
    before = {r["url"]: r for r in tier(url)["replicas"]}
    running = [s.replica for s in streams if s.ending is None]
    assert running, "every stream ended before the kill; make them longer"
    victim = before[running[0]]
    os.kill(victim["pid"], signal.SIGKILL)
    t_kill = time.monotonic()

    for s in streams:
        s.join(HANG_BOUND_S + 5)
    assert not any(s.is_alive() for s in streams), "a client was left hanging"
    assert time.monotonic() - t_kill < HANG_BOUND_S
    endings = [(s.replica == victim["url"], s.ending) for s in streams]
    for s in streams:
        if s.replica == victim["url"] and s.ending == "error":
            assert s.error is not None and set(s.error) == {"message", "type", "param", "code"}
            assert "mid-stream" in s.error["message"]
        else:
            assert s.ending == "done", (endings, s.error)
    assert any(on_victim and ending == "error" for on_victim, ending in endings), endings

    # Meanwhile new requests are served; the killed replica comes back under its id.
    for _ in range(4):
        r = complete(url, max_tokens=8)
        assert r.status_code == 200, r.text
    wait_for(lambda: any(r["id"] == victim["id"] and r["pid"] != victim["pid"]
                         and r["phase"] == "ready" for r in tier(url)["replicas"]), 60,
             "the killed replica restarted")
    again = {r["id"]: r for r in tier(url)["replicas"]}[victim["id"]]
    assert again["restarts"] == 1 and "status -9" in again["last_exit"]
    assert not alive(victim["pid"])
    wait_for(lambda: tier(url)["ready"] == 2, 30, "both replicas in the gateway again")
    assert complete(url, max_tokens=8).status_code == 200
