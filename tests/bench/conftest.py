"""Fixtures for the bench tests: fake OpenAI backends as real processes on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest


def free_port() -> int:
    """Ask the OS for a loopback port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_fake_backend(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m strata.bench.fake_backend`` and wait until /health answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "strata.bench.fake_backend", "--port", str(port), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake backend exited: {proc.stderr.read().decode()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fake backend did not become healthy in 30 s")


@pytest.fixture
def fake_backend() -> Iterator[Callable[..., str]]:
    """Factory: start a fake backend with CLI args, get its base URL; all stop at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def factory(*args: str) -> str:
        proc, url = start_fake_backend(*args)
        procs.append(proc)
        return url

    yield factory
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def bundled_tokenizer():  # noqa: ANN201 - the Tokenizer protocol of strata.bench.prompts
    """The bundled model's tokenizer (fetched and cached on first use)."""
    from strata.bench.prompts import load_bench_tokenizer

    return load_bench_tokenizer(None)


@pytest.fixture(scope="session")
def synthesizer(bundled_tokenizer):  # noqa: ANN001, ANN201
    """One prompt synthesizer for the session: its safe vocabulary takes a moment to build."""
    from strata.bench.prompts import PromptSynthesizer

    return PromptSynthesizer(bundled_tokenizer, seed=0)
