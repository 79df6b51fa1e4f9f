#!/usr/bin/env bash
# Builds strata's container image from deploy/Dockerfile with buildah.
#
#   scripts/build_image.sh                  # -> localhost/strata:latest
#   IMAGE=strata:dev KERNEL_MARCH=native scripts/build_image.sh [extra buildah build args]
#
# Works on a fresh Debian/Ubuntu machine that reaches only PyPI and the Debian archive. Run
# as root (or under sudo): it installs what is missing with apt-get -- buildah (which brings
# its runtime, storage and network helpers) and, only when the base image cannot be pulled,
# debootstrap. Steps:
#   1. a CPU torch wheel into deploy/wheels (git-ignored), which the Dockerfile installs from
#      before any index: PyPI's Linux torch is a multi-GB CUDA build, the CPU build is ~190 MB.
#      pip's own configuration applies, so a local mirror or find-links serves it offline.
#   2. the base image: BASE_IMAGE (default python:3.11-slim-bookworm) if it can be pulled;
#      otherwise a Debian bookworm base made here from Debian's packages (debootstrap
#      --variant=minbase plus python3, python3-venv, ca-certificates), committed once as
#      localhost/strata-base:bookworm and reused by later builds.
#   3. buildah build --isolation chroot --layers --format docker (docker format keeps the
#      HEALTHCHECK, which OCI image configs cannot hold; chroot isolation works where user
#      namespaces or setrlimit are refused; --layers caches steps between builds), with the
#      CA bundle that PIP_CERT names passed as a build secret, never stored in the image.
#
# Environment: IMAGE, BASE_IMAGE, KERNEL_MARCH (see deploy/Dockerfile), TORCH_VERSION,
# DEBIAN_MIRROR, PIP_CERT; STORAGE_DRIVER=vfs if buildah's default overlay storage fails.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/strata:latest}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
LOCAL_BASE=localhost/strata-base:bookworm
KERNEL_MARCH=${KERNEL_MARCH:-x86-64-v3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${PYTHON:-python3}
WHEELS=deploy/wheels

log() { printf '[build_image] %s\n' "$*" >&2; }

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    log "need root to install $*: run under sudo, or install them first"; exit 1
  fi
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# Step 1: the CPU torch wheel. The wheel's tags are the image's Python (3.11 in both bases).
prepare_wheels() {
  if compgen -G "$WHEELS/torch-${TORCH_VERSION}+cpu-*.whl" >/dev/null; then
    return
  fi
  log "downloading torch ${TORCH_VERSION}+cpu into $WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --extra-index-url "$TORCH_INDEX_URL" \
    -d "$WHEELS" "torch==${TORCH_VERSION}+cpu"
}

# Step 2 (fallback): a minimal Debian bookworm image with Python, from Debian's packages.
make_debian_base() {
  command -v debootstrap >/dev/null || apt_install debootstrap
  local rootfs ctr
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  rootfs=$work/rootfs
  log "debootstrapping Debian bookworm (minbase + python3) from $DEBIAN_MIRROR"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  # Updates and security fixes for the apt-get install in the Dockerfile's build stage.
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  # The container runtime provides these at run time; the package caches only add size.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/* \
    "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname
  tar --numeric-owner -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -cf "$work/rootfs.tar" .
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$work/rootfs.tar" / >/dev/null
  buildah config --env LANG=C.UTF-8 \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd '["python3"]' --label org.opencontainers.image.description="Debian bookworm minbase with python3" \
    "$ctr"
  buildah commit --rm "$ctr" "$LOCAL_BASE" >/dev/null
  log "committed $LOCAL_BASE"
}

# Step 2: which base to build on.
choose_base() {
  if image_exists "$BASE_IMAGE" || buildah pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "$BASE_IMAGE"; return
  fi
  log "cannot pull $BASE_IMAGE; using $LOCAL_BASE"
  image_exists "$LOCAL_BASE" || make_debian_base
  echo "$LOCAL_BASE"
}

command -v buildah >/dev/null || apt_install buildah
prepare_wheels
base=$(choose_base)

secret=()
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
  secret=(--secret "id=pipcert,src=$PIP_CERT")
fi

log "building $IMAGE on $base (kernels for $KERNEL_MARCH)"
buildah build --isolation chroot --layers --network host --format docker -f deploy/Dockerfile -t "$IMAGE" \
  --build-arg BASE_IMAGE="$base" --build-arg KERNEL_MARCH="$KERNEL_MARCH" \
  --build-arg TORCH_VERSION="$TORCH_VERSION" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
  "${secret[@]}" "$@" .
log "built $IMAGE"
