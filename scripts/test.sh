#!/usr/bin/env bash
# Installs everything strata's tests need on a fresh machine, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# System packages: Prometheus (a real server for the autoscaler's integration test) and a
# C++ compiler for strata's native CPU kernels (present on most machines already).
bash scripts/install_prometheus.sh
command -v g++ >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q g++; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and exactly: a looser request could pull a multi-GB CUDA build.
python -m pip install -q "torch>=2.6,<2.14"
python -m pip install -q -e ".[test]"
# Security checks before the tests: bandit (config and justified skips in pyproject.toml)
# and pip-audit of the installed environment (fails on any known vulnerability; only an
# unreachable advisory service is tolerated, with a warning).
python -m bandit -c pyproject.toml -r strata -q
python scripts/audit_deps.py
python -m pytest -q -ra "$@"
