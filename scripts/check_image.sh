#!/usr/bin/env bash
# Builds strata's image (scripts/build_image.sh) and runs it for real: `strata engine` in a
# container on loopback, a completion from the bundled model, and the image's promises --
# non-root user, no compiler, the native kernels loaded from the build-time cache with no
# compilation, the HEALTHCHECK command passing.
#
#   scripts/check_image.sh            # build (cached after the first time), then check
#   SKIP_BUILD=1 scripts/check_image.sh
#
# Not run by CI (scripts/test.sh): the first build downloads torch and strata's dependencies
# and takes minutes; CI lints the Dockerfile instead (tests/deploy/test_dockerfile.py).
# Needs root for buildah (as build_image.sh). The container shares the host's network and
# binds 127.0.0.1 only. The bundled model comes from this checkout's model cache (.venv's
# strata fetches it there first if needed), copied into a scratch volume, so the container
# downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/strata:latest}
PY=${PYTHON:-.venv/bin/python}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-300}
UID_IN_IMAGE=10001

log() { printf '[check_image] %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

if [ -z "${SKIP_BUILD:-}" ]; then
  start=$(date +%s)
  scripts/build_image.sh
  log "build took $(( $(date +%s) - start )) s"
fi

work=$(mktemp -d)
ctr=""
engine_pid=""
cleanup() {
  # The engine runs in its own process group (setsid below): stop that group, then the
  # working container.
  if [ -n "$engine_pid" ] && kill -0 "$engine_pid" 2>/dev/null; then
    kill -TERM -- "-$engine_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$engine_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$engine_pid" 2>/dev/null || true
  fi
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# The model cache volume: the bundled GGUF and its verified-marker, owned by the image's user.
gguf=$("$PY" -c "from strata.engine.weights import bundled_model_path; print(bundled_model_path())")
mkdir -p "$work/cache"
cp "$gguf" "$gguf.verified" "$work/cache/"
chown -R "$UID_IN_IMAGE:$UID_IN_IMAGE" "$work/cache"

port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
ctr=$(buildah from --pull-never --name "strata-check-$$" "$IMAGE")
run() { buildah run --isolation chroot --network host -v "$work/cache:/var/cache/strata" "$ctr" -- "$@"; }

[ "$(run id -u)" = "$UID_IN_IMAGE" ] || fail "the image does not run as uid $UID_IN_IMAGE"
if run sh -c 'command -v g++ || command -v gcc || command -v c++ || command -v cc' 2>/dev/null; then
  fail "the runtime image has a compiler"
fi

# The kernels load from the cache built into the image: with no compiler here, any rebuild
# would fail and load_paged_attention() would return False.
t0=$EPOCHREALTIME
run python -c "import sys; from strata.engine.kernels import load_paged_attention; sys.exit(0 if load_paged_attention() else 1)" \
  || fail "the native kernels did not load from the image's build-time cache"
log "native kernels loaded in $(since "$t0") s (process start included)"

log "starting strata engine on 127.0.0.1:$port"
t0=$EPOCHREALTIME
setsid buildah run --isolation chroot --network host -v "$work/cache:/var/cache/strata" "$ctr" -- \
  strata engine --host 127.0.0.1 --port "$port" --kv-cache 256MiB >"$work/engine.log" 2>&1 &
engine_pid=$!

PORT=$port HEALTH_TIMEOUT_S=$HEALTH_TIMEOUT_S "$PY" - <<'EOF' || { tail -30 "$work/engine.log" >&2; fail "no completion"; }
import json
import os
import time
import urllib.request

base = f"http://127.0.0.1:{os.environ['PORT']}"
deadline = time.monotonic() + float(os.environ["HEALTH_TIMEOUT_S"])
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        raise SystemExit("engine not healthy in time")
    time.sleep(0.5)
with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
    model = json.load(r)["data"][0]["id"]
body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 16,
                   "temperature": 0}).encode()
req = urllib.request.Request(base + "/v1/completions", data=body,
                             headers={"Content-Type": "application/json"})
t = time.monotonic()
with urllib.request.urlopen(req, timeout=120) as r:
    assert r.status == 200, r.status
    out = json.load(r)
text = out["choices"][0]["text"]
assert text.strip(), out
print(f"[check_image] completion from {model} in {time.monotonic() - t:.2f} s: {text!r}")
EOF
log "engine healthy and answered $(since "$t0") s after start"

if grep -qiE "unavailable|error|traceback" "$work/engine.log"; then
  cat "$work/engine.log" >&2
  fail "the engine logged a problem (kernels rebuilt or failed?)"
fi

# The image's own HEALTHCHECK command, pointed at this engine's port.
mapfile -t probe < <(buildah inspect --type image "$IMAGE" | P="$port" "$PY" -c "
import json, os, sys
health = json.load(sys.stdin)['Docker']['config'].get('Healthcheck')
if not health:
    sys.exit('the image has no HEALTHCHECK (built without --format docker?)')
test = health['Test']
assert test[0] == 'CMD', test
print('\n'.join(a.replace(':8000/', ':' + os.environ['P'] + '/') for a in test[1:]))")
[ "${#probe[@]}" -gt 0 ] || fail "no HEALTHCHECK command in $IMAGE"
run "${probe[@]}" || fail "the image's HEALTHCHECK command failed against a healthy engine"
log "HEALTHCHECK command passed"
log "OK: $IMAGE"
