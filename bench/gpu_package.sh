#!/usr/bin/env bash
# Builds what bench/gpu_check.sh carries to a GPU machine, into bench/work/gpu/ (gitignored):
# the `torch` build (lanner-torch.xz), the `cuda` build (lanner.xz) and the data generator
# (make_shapes), stripped and compressed to fit the device tool's 64 MiB carry limit.
#
#   bash bench/gpu_package.sh [--no-cuda]
#
# The `torch` build compiles against PyTorch 2.11, the version on the GPU machines: the
# libtorch folder $LIBTORCH when set, else the wheel's `torch/` folder, which this script
# pip-installs (with its NVIDIA libraries, about 4.5 GB) into $TORCH_DIR (default
# target/torch-2.11) when it is not there yet. Both builds write target/release/lanner, so each
# is copied out before the next. About 5 minutes for the `torch` build and 10-25 for the
# `cuda` build on 2 cores, less when target/ already holds most of the work.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/work/gpu
mkdir -p "$OUT"

if [ -z "${LIBTORCH:-}" ]; then
  TORCH_DIR=${TORCH_DIR:-$PWD/target/torch-2.11}
  if [ ! -f "$TORCH_DIR/torch/include/torch/script.h" ]; then
    python3 -m pip install --quiet --no-compile --target "$TORCH_DIR" torch==2.11.0
  fi
  export LIBTORCH=$TORCH_DIR/torch
fi

pack() {  # pack NAME: strip target/release/lanner into $OUT/NAME.xz
  strip -o "$OUT/$1" target/release/lanner
  xz -T2 -9 -f "$OUT/$1"
  ls -l "$OUT/$1.xz"
}

cargo build --release -p lanner --features torch
pack lanner-torch
if [ "${1:-}" != "--no-cuda" ]; then
  cargo build --release -p lanner --features cuda
  pack lanner
fi
cargo build --release -p lanner-data --example make_shapes
strip -o "$OUT/make_shapes" target/release/examples/make_shapes
du -sh "$OUT"
echo "carry bench/work/gpu and run: bash bench/gpu_check.sh \$OUT/check"
