"""Running ``strata serve`` as a process in tests, and reading its status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml


def start_cluster(config: dict[str, Any], tmp_path: Path) -> tuple[subprocess.Popen, str]:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "cluster.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from strata.cluster import serve_cluster; serve_cluster(Path(sys.argv[1]))", str(path)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{config['gateway']['port']}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (tmp_path / "cluster.log").read_text()
        try:
            if httpx.get(url + "/admin/status", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "cluster did not come up"
        time.sleep(0.2)


def stop_cluster(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode


def status(url: str) -> dict[str, Any]:
    return httpx.get(url + "/admin/status", timeout=5).json()


def tier(url: str) -> dict[str, Any]:
    return status(url)["tiers"][0]


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.25)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (ProcessLookupError, OSError):
        return False


def complete(url: str, max_tokens: int = 16, **extra: Any) -> httpx.Response:
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=180)
