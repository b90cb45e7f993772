#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU (no Rust toolchain needed there):
# correctness first, then cold start, then throughput next to PyTorch.
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# Needs, prepared on the build machine (see README "GPU build"):
#   bench/work/gpu/lanner        cargo build --release -p lanner --features cuda
#   bench/work/gpu/make_shapes   cargo build --release -p lanner-data --example make_shapes
# and optionally, to compare cold starts without burn's kernel fusion and autotune:
#   bench/work/gpu/lanner-unfused  cargo build --release -p lanner --features cuda-base
# and, on the GPU machine, python3 with torch, timm and safetensors (bench/gpu_torch.py).
#
# Every stage has its own time limit and writes its output under OUT_DIR as it goes, so a stage
# that hangs (a cold kernel compile) costs only its own limit. `DEADLINE` (seconds, default
# 500) bounds the whole run: stages that would not fit are skipped and say so.
#
# Stages:
#   env         the GPU, driver, NVRTC and headers the binary found
#   cold/warm   time to the first finished training step of a small model with an empty
#               kernel cache, then again with the cache the first run filled
#   cold-unfused  the cold run again with the unfused binary, when it is there
#   correct     the seed recipe (frozen head, then fine-tune) from the same starting weights and
#               data on the CPU and on the GPU; the weights must agree; `lanner evaluate` of
#               the GPU model on both devices must agree
#   correct-cuda-bf16  the same recipe on the GPU in bf16 (`--precision bf16`): its
#               validation metrics next to f32's; every epoch line says how long the steps
#               waited for the loader
#   lanner-*    `lanner bench` rows: MobileNetV3-Large 224 and Xception 299, batch 32 and 256,
#               f32 and (MobileNetV3-Large, batch 32) bf16
#   torch       bench/gpu_torch.py: PyTorch (f32 NCHW, AMP bf16 channels_last) in the same rows
set -u
OUT=${1:-${OUT:-/tmp/lanner-gpu-check}}
mkdir -p "$OUT"
BIN=${LANNER_BIN:-bench/work/gpu/lanner}
SHAPES=${SHAPES_BIN:-bench/work/gpu/make_shapes}
UNFUSED=${LANNER_UNFUSED_BIN:-bench/work/gpu/lanner-unfused}
DEADLINE=${DEADLINE:-500}
WORK=$(mktemp -d)
STARTED=$(date +%s)
if [ -z "${CUDA_PATH:-}" ]; then
  CUDA_PATH=$(ls -d /usr/local/cuda /usr/local/cuda-13* 2>/dev/null | head -1)
  export CUDA_PATH
fi

log() { echo "[$(date +%T) +$(( $(date +%s) - STARTED ))s] $*" | tee -a "$OUT/log.txt"; }

# stage NAME LIMIT COMMAND...: run with a time limit, keep stdout/stderr, log rc and seconds.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE - ($(date +%s) - STARTED) ))
  if [ "$left" -lt 15 ]; then
    log "== $name skipped: ${left}s left of the ${DEADLINE}s deadline"
    return 99
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "== $name (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s.%N)
  timeout --signal=TERM --kill-after=5 "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  rc=$?
  log "   $name: rc=$rc after $(python3 -c "import time; print(round(time.time() - $t0, 1))")s"
  tail -n 12 "$OUT/$name.out" | sed 's/^/   | /' | tee -a "$OUT/log.txt"
  [ "$rc" -ne 0 ] && tail -n 8 "$OUT/$name.err" | sed 's/^/   ! /' | tee -a "$OUT/log.txt"
  return $rc
}

log "GPU check; binary $BIN ($(du -h "$BIN" | cut -f1)); CUDA_PATH=$CUDA_PATH"
stage env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
  ls /usr/local | grep -i cuda; ls \$CUDA_PATH/include/cuda_fp16.h; \
  find / -name 'libnvrtc.so*' -not -path '*/proc/*' 2>/dev/null | head -3; nproc; $BIN --version"

# Cold start: an empty kernel cache, then the cache that run filled.
export LANNER_KERNEL_CACHE=$WORK/kernels-small
SMALL=(bench --arch mobilenet_v3_small_050 --image-size 64 --batch-size 8 --steps 3 --warmup 1
       --device cuda --json --step frozen --step fine-tune --step inference)
CUBECL_DEBUG_LOG=$OUT/cubecl-cold.log stage cold 120 "$BIN" "${SMALL[@]}"
stage warm 60 "$BIN" "${SMALL[@]}"
du -sh "$LANNER_KERNEL_CACHE" 2>&1 | tee -a "$OUT/log.txt"
if [ -x "$UNFUSED" ]; then
  LANNER_KERNEL_CACHE=$WORK/kernels-unfused stage cold-unfused 120 "$UNFUSED" "${SMALL[@]}"
  du -sh "$WORK/kernels-unfused" 2>&1 | tee -a "$OUT/log.txt"
fi
[ -f "$OUT/cubecl-cold.log" ] && { wc -l "$OUT/cubecl-cold.log" | tee -a "$OUT/log.txt";
  gzip -f "$OUT/cubecl-cold.log"; }

# Correctness: the same starting weights and data on both devices.
"$SHAPES" "$WORK/shapes" --per-class 24 --size 96x72 --seed 3 >/dev/null
TRAIN=(train --train "$WORK/shapes/train" --validation "$WORK/shapes/validation"
       --arch mobilenet_v3_small_050 --image-size 64 --batch-size 16 --seed 5 --overwrite)
stage start 120 "$BIN" "${TRAIN[@]}" --device cpu --weights none --from-scratch \
  --initial-epochs 1 --fine-tune-epochs 0 --model-dir "$WORK/start"
for device in cpu cuda; do
  stage "correct-$device" 150 "$BIN" "${TRAIN[@]}" --device "$device" \
    --weights "$WORK/start/weights.safetensors" --initial-epochs 1 --fine-tune-epochs 1 \
    --fine-tune-layer 100 --model-dir "$WORK/model-$device" --output-data-dir "$WORK/out-$device"
done
stage correct-cuda-bf16 150 "$BIN" "${TRAIN[@]}" --device cuda --precision bf16 \
  --weights "$WORK/start/weights.safetensors" --initial-epochs 1 --fine-tune-epochs 1 \
  --fine-tune-layer 100 --model-dir "$WORK/model-cuda-bf16" --output-data-dir "$WORK/out-cuda-bf16"
for device in cpu cuda; do
  stage "evaluate-on-$device" 90 "$BIN" evaluate --model "$WORK/model-cuda" \
    --data "$WORK/shapes/validation" --device "$device" --json
done
stage compare 60 python3 - "$WORK" "$OUT" <<'EOF'
import json, sys
from safetensors.numpy import load_file
work = sys.argv[1]
cpu, gpu = (load_file(f"{work}/model-{d}/weights.safetensors") for d in ("cpu", "cuda"))
worst = max((abs(cpu[k] - gpu[k]).max() / (abs(cpu[k]).max() + 1e-12), k) for k in cpu)
print(json.dumps({"tensors": len(cpu), "same_names": sorted(cpu) == sorted(gpu),
                  "worst_relative_difference": float(worst[0]), "worst_tensor": worst[1]}))
for d in ("cpu", "cuda", "cuda-bf16"):
    try:
        lines = [json.loads(l) for l in open(f"{work}/out-{d}/metrics.jsonl")]
    except OSError as error:
        print(d, error)
        continue
    keys = ("loss", "val_loss", "val_accuracy", "data_wait_share")
    print(d, json.dumps({k: lines[-1].get(k) for k in keys}))
for d in ("cpu", "cuda"):
    try:
        print(f"evaluate on {d}:", open(f"{sys.argv[2]}/evaluate-on-{d}.out").read().strip())
    except OSError as error:
        print(f"evaluate on {d}: {error}")
EOF

# Throughput, Lanner then PyTorch, the same rows.
export LANNER_KERNEL_CACHE=$WORK/kernels-large
stage lanner-mbv3-b32 150 "$BIN" bench --arch mobilenet_v3_large --batch-size 32 --steps 10 \
  --warmup 2 --device cuda --json --step frozen --step fine-tune --step full --step inference
stage lanner-mbv3-b32-bf16 100 "$BIN" bench --arch mobilenet_v3_large --batch-size 32 \
  --steps 10 --warmup 2 --device cuda --json --precision bf16 --step frozen --step fine-tune \
  --step inference
stage torch 110 python3 bench/gpu_torch.py --steps 15 --warmup 5
stage lanner-mbv3-b256 80 "$BIN" bench --arch mobilenet_v3_large --batch-size 256 --steps 5 \
  --warmup 1 --device cuda --json --step frozen --step full --step inference
stage lanner-xception-b32 80 "$BIN" bench --arch xception --batch-size 32 --steps 5 \
  --warmup 1 --device cuda --json --step frozen --step full --step inference
stage lanner-mbv3-warm 40 "$BIN" bench --arch mobilenet_v3_large --batch-size 32 --steps 3 \
  --warmup 1 --device cuda --json --step frozen
du -sh "$WORK"/kernels-* 2>&1 | tee -a "$OUT/log.txt"
log "done"
