#!/bin/sh
# The image build's c++ (deploy/Dockerfile): strata/engine/kernels.py compiles with
# -march=native, which would tie the image to the build machine's CPU; this passes every
# argument through to g++ except that one, which becomes -march=$KERNEL_MARCH.
for arg in "$@"; do
  shift
  [ "$arg" = -march=native ] && arg="-march=${KERNEL_MARCH:?KERNEL_MARCH is not set}"
  set -- "$@" "$arg"
done
exec g++ "$@"
