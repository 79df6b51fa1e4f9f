#!/usr/bin/env bash
# Installs Debian's `prometheus` for strata's Prometheus integration test, if it is missing.
# Needs root (or sudo) and apt; does nothing when a `prometheus` binary is already on PATH.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_prometheus.sh: no apt-get here; install Prometheus yourself (https://prometheus.io/download/)" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# --no-install-recommends: the server binary only, without the exporters and their services.
$SUDO apt-get install -y -q --no-install-recommends prometheus
# The package may start a system-wide server on :9090; the test runs its own on loopback.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  $SUDO systemctl stop prometheus || true
fi
command -v prometheus >/dev/null
