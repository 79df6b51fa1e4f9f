"""External binaries some tests need (Prometheus' tools): skipped locally, required in CI."""

from __future__ import annotations

import os
import shutil

import pytest


def required_binary(name: str, install: str = "scripts/install_prometheus.sh") -> str:
    """The path of ``name``; without it the test skips, or fails under CI=true (.ci/run
    installs it, so a missing binary there is a broken set-up, not a reason to skip)."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (run {install})"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI=true requires this test to run")
        pytest.skip(reason)
    return path
