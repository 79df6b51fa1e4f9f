"""Helpers to run strata services as real processes on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout_s}s")


def start_engine(model: Path | str, *args: str) -> tuple[subprocess.Popen, str]:
    """Start `strata engine` on a free loopback port; returns (process, base URL)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "strata.cli", "engine", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--dtype", "float32",
        *args,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def engine_url(bundled_gguf: Path) -> Iterator[str]:
    """A real engine process serving the bundled model."""
    proc, url = start_engine(bundled_gguf, "--num-kv-blocks", "512", "--max-model-len", "2048")
    yield url
    stop(proc)
