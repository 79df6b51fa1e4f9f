#!/usr/bin/env bash
# Installs strata into .venv (first run only) and serves the bundled model on 127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/strata ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch>=2.6,<2.14"
  .venv/bin/python -m pip install -q -e .
fi
exec .venv/bin/strata serve "$@"
