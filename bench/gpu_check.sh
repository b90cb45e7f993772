#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU (no Rust toolchain needed there):
# for each GPU build present, correctness first, then cold start, then throughput; and
# PyTorch's own numbers in the same run.
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# Needs, prepared on the build machine (`bash bench/gpu_package.sh` builds them all; see README
# "GPU build"):
#   bench/work/gpu/lanner-torch  LIBTORCH=<torch/ of the GPU machine's PyTorch version> \
#                                cargo build --release -p lanner --features torch
#   bench/work/gpu/lanner        cargo build --release -p lanner --features cuda
#   bench/work/gpu/make_shapes   cargo build --release -p lanner-data --example make_shapes
# and optionally, to compare cold starts without burn's kernel fusion and autotune:
#   bench/work/gpu/lanner-unfused  cargo build --release -p lanner --features cuda-base
# and, on the GPU machine, python3 with torch, timm and safetensors (bench/gpu_torch.py). The
# `torch` build runs with that PyTorch's torch/lib on LD_LIBRARY_PATH. To carry the binaries
# (64 MiB in all), strip them and compress them with xz (`NAME.xz`): they are unpacked here.
#
# Every stage has its own time limit, so a stage that hangs (a cold kernel compile) costs only
# its own limit. `DEADLINE` (seconds, default 480) bounds the whole run: stages that would not
# fit are skipped and say so. The stages run in the order of what matters most, so that a short
# lease still answers the first questions: the `torch` build's cold start, correctness and
# throughput table (and its BatchNorm kernels compared), then PyTorch's table, then the `torch`
# build training from image files (the data loader keeping the GPU fed), then the rest, with
# the `cuda` build last (its cold start was over 100 s on 2026-11-26 and 2026-11-28).
# `SECTIONS` (default `cold correct table batch-norm peer files extras cuda cuda-all`) picks
# the parts and their order, `PRECISIONS` (default `f32 bf16`) the `torch` build's precisions in the
# correctness and throughput stages (`SCRATCH_PRECISIONS` those of the from-scratch epochs),
# `PEER_ARGS` the arguments of bench/gpu_torch.py, `COPY_STREAMS` (default `on off`) the
# copy-stream settings of the training from files: a second, shorter call can rerun a part.
# `GPU_DEVICE` (default cuda) is the device the GPU stages ask for: `GPU_DEVICE=libtorch-cpu`
# rehearses the whole script on a machine without a GPU.
#
# OUT_DIR receives few files (a device machine may hand back only a handful): log.txt (every
# stage's command, exit status, time and the tail of its output), stages.txt (each stage's
# whole stdout and the end of its stderr, appended as it ends) and the cubecl debug logs.
#
# Stages, for each build B (torch, cuda):
#   B-cold/B-warm  time to the first finished training step of a small model with an empty
#               kernel cache, then again with the cache the first run filled
#   torch-libraries  the shared libraries the `torch` build resolves on that machine
#   torch-syncs-*  how often the `torch` build's steps make the host wait for the GPU
#   B-correct-*  the seed recipe (frozen head, then fine-tune) from the same starting weights
#               and data on the CPU and on the GPU (f32, then bf16); B-scratch-*: one
#               epoch of every layer training, BatchNorm on batch statistics, from the same
#               weights (f32, bf16), and on two replicas of the GPU (LANNER_REPLICAS=2);
#               B-compare: the weights must agree, and `lanner evaluate` of the GPU
#               model must agree on both devices
#   B-mobilenet-*, B-xception-*  `lanner bench` rows: MobileNetV3-Large 224 and Xception 299,
#               batch 32 and 256, f32 and bf16
#   torch-peer  bench/gpu_torch.py: PyTorch (f32 NCHW, AMP bf16 channels_last), the same rows
#   torch-*-aten-batch-norm  the `full` step with ATen's own BatchNorm kernels
#   torch-*-channels-last, torch-*-nchw, torch-*-readback-every-step,
#   torch-*-composite-layers  the `torch` build with its memory order, logit readback and
#               fused layers switched from their defaults
#   torch-train-*-copy-stream-on|off  `lanner train` from 2,048 image files (MobileNetV3-L,
#               224, batch 256, bf16): images/s and the share of time waiting for data per
#               epoch, with host-to-GPU copies on their own stream and on the compute stream
set -u
OUT=${1:-${OUT:-/tmp/lanner-gpu-check}}
mkdir -p "$OUT"
BIN=${LANNER_BIN:-bench/work/gpu/lanner}
SHAPES=${SHAPES_BIN:-bench/work/gpu/make_shapes}
UNFUSED=${LANNER_UNFUSED_BIN:-bench/work/gpu/lanner-unfused}
TORCH_BIN=${LANNER_TORCH_BIN:-bench/work/gpu/lanner-torch}
DEADLINE=${DEADLINE:-480}
# What runs, in this order (default: all), in which precisions, and PyTorch's arguments.
SECTIONS=${SECTIONS:-cold correct table batch-norm peer files extras cuda cuda-all}
PRECISIONS=${PRECISIONS:-f32 bf16}
SCRATCH_PRECISIONS=${SCRATCH_PRECISIONS-$PRECISIONS}
PEER_ARGS=${PEER_ARGS:---steps 15 --warmup 5}
COPY_STREAMS=${COPY_STREAMS:-on off}
GPU=${GPU_DEVICE:-cuda}
WORK=$(mktemp -d)
STAGES=$WORK/stages
mkdir -p "$STAGES"
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
  timeout --signal=TERM --kill-after=5 "$limit" "$@" >"$STAGES/$name.out" 2>"$STAGES/$name.err"
  rc=$?
  log "   $name: rc=$rc after $(python3 -c "import time; print(round(time.time() - $t0, 1))")s"
  tail -n 12 "$STAGES/$name.out" | sed 's/^/   | /' | tee -a "$OUT/log.txt"
  [ "$rc" -ne 0 ] && tail -n 8 "$STAGES/$name.err" | sed 's/^/   ! /' | tee -a "$OUT/log.txt"
  { echo "===== $name: rc=$rc: $*"; cat "$STAGES/$name.out"; echo "----- stderr (last 60 lines)"
    tail -n 60 "$STAGES/$name.err"; } >>"$OUT/stages.txt"
  return $rc
}

for bin in "$TORCH_BIN" "$BIN" "$UNFUSED" "$SHAPES"; do
  [ -f "$bin.xz" ] && [ ! -f "$bin" ] && xz -dk "$bin.xz" && chmod +x "$bin"
done
log "GPU check; CUDA_PATH=$CUDA_PATH"
for bin in "$TORCH_BIN" "$BIN" "$UNFUSED"; do
  [ -x "$bin" ] && log "binary $bin ($(du -h "$bin" | cut -f1))"
done
stage env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
  ls /usr/local | grep -i cuda; ls \$CUDA_PATH/include/cuda_fp16.h; nproc; \
  python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())'; \
  find / -name 'libnvrtc.so*' -not -path '*/proc/*' 2>/dev/null | head -3"

"$SHAPES" "$WORK/shapes" --per-class 24 --size 96x72 --seed 3 >/dev/null
SMALL=(bench --arch mobilenet_v3_small_050 --image-size 64 --batch-size 8 --steps 3 --warmup 1
       --device "$GPU" --json --step frozen --step fine-tune --step inference)
TRAIN=(train --train "$WORK/shapes/train" --validation "$WORK/shapes/validation"
       --arch mobilenet_v3_small_050 --image-size 64 --batch-size 16 --seed 5 --overwrite)
START=$WORK/start/weights.safetensors

# cold_start B BINARY COLD_LIMIT: the first finished training step of one build, with an empty
# kernel cache and then with the one the first run filled.
cold_start() {
  local b=$1 bin=$2 cold=$3
  export LANNER_KERNEL_CACHE=$WORK/kernels-$b-small
  stage "$b-version" 20 "$bin" --version || return
  CUBECL_DEBUG_LOG=$OUT/cubecl-$b-cold.log stage "$b-cold" "$cold" "$bin" "${SMALL[@]}"
  local cold_rc=$?
  [ -f "$OUT/cubecl-$b-cold.log" ] && gzip -f "$OUT/cubecl-$b-cold.log"
  [ "$cold_rc" -eq 0 ] || return
  stage "$b-warm" 60 "$bin" "${SMALL[@]}"
  du -sh "$LANNER_KERNEL_CACHE" 2>&1 | tee -a "$OUT/log.txt"
}

# check_build B BINARY: correctness of one build, CPU against GPU.
check_build() {
  local b=$1 bin=$2
  export LANNER_KERNEL_CACHE=$WORK/kernels-$b-small
  # Correctness: the same starting weights and data on both devices.
  [ -f "$START" ] || stage start 120 "$bin" "${TRAIN[@]}" --device cpu --weights none \
    --from-scratch --initial-epochs 1 --fine-tune-epochs 0 --model-dir "$WORK/start"
  [ -f "$WORK/model-cpu/weights.safetensors" ] || stage correct-cpu 120 "$bin" "${TRAIN[@]}" \
    --device cpu --weights "$START" --initial-epochs 1 --fine-tune-epochs 1 \
    --fine-tune-layer 100 --model-dir "$WORK/model-cpu" --output-data-dir "$WORK/out-cpu"
  local precision
  for precision in $PRECISIONS; do
    stage "$b-correct-$precision" 120 "$bin" "${TRAIN[@]}" --device "$GPU" \
      --precision "$precision" --weights "$START" --initial-epochs 1 --fine-tune-epochs 1 \
      --fine-tune-layer 100 --model-dir "$WORK/model-$b-$precision" \
      --output-data-dir "$WORK/out-$b-$precision"
  done
  # Every layer training with BatchNorm on batch statistics (and updating its running ones),
  # from the same weights: one epoch on each device.
  [ -f "$WORK/scratch-cpu/weights.safetensors" ] || stage scratch-cpu 120 "$bin" "${TRAIN[@]}" \
    --device cpu --weights "$START" --from-scratch --initial-epochs 1 --fine-tune-epochs 0 \
    --model-dir "$WORK/scratch-cpu"
  for precision in $SCRATCH_PRECISIONS; do
    stage "$b-scratch-$precision" 120 "$bin" "${TRAIN[@]}" --device "$GPU" \
      --precision "$precision" --weights "$START" --from-scratch --initial-epochs 1 \
      --fine-tune-epochs 0 --model-dir "$WORK/scratch-$b-$precision"
  done
  # The same epoch data-parallel over two replicas of the one GPU (BatchNorm statistics gathered
  # across them): the weights must agree with one replica's.
  [[ " $SCRATCH_PRECISIONS " == *" f32 "* ]] && LANNER_REPLICAS=2 stage "$b-scratch-replicas" 120 "$bin" "${TRAIN[@]}" \
    --device "$GPU" --weights "$START" --from-scratch --initial-epochs 1 --fine-tune-epochs 0 \
    --model-dir "$WORK/scratch-$b-replicas"
  local device
  for device in cpu "$GPU"; do
    stage "$b-evaluate-on-$device" 60 "$bin" evaluate --model "$WORK/model-$b-${PRECISIONS%% *}" \
      --data "$WORK/shapes/validation" --device "$device" --json
  done
  stage "$b-compare" 60 python3 - "$WORK" "$STAGES" "$b" "$GPU" <<'EOF'
import json, sys
from safetensors.numpy import load_file
work, stages, b, gpu_device = sys.argv[1:]
start = load_file(f"{work}/start/weights.safetensors")
runs = [("model-cpu", f"model-{b}-f32", "f32"), ("model-cpu", f"model-{b}-bf16", "bf16"),
        ("scratch-cpu", f"scratch-{b}-f32", "from-scratch f32"),
        ("scratch-cpu", f"scratch-{b}-bf16", "from-scratch bf16"),
        (f"scratch-{b}-f32", f"scratch-{b}-replicas", "from-scratch f32, 2 replicas vs 1")]
for cpu_run, gpu_run, what in runs:
    try:
        cpu = load_file(f"{work}/{cpu_run}/weights.safetensors")
        gpu = load_file(f"{work}/{gpu_run}/weights.safetensors")
    except Exception as error:
        print(what, error)
        continue
    worst = max((abs(cpu[k] - gpu[k]).max() / (abs(cpu[k]).max() + 1e-12), k) for k in cpu)
    # The training updates (trained - start) are what a wrong gradient would change most.
    moved = [k for k in cpu if abs(cpu[k] - start[k]).max() > 0]
    worst_update = max((abs((gpu[k] - start[k]) - (cpu[k] - start[k])).max()
                        / abs(cpu[k] - start[k]).max(), k) for k in moved)
    unmoved = sum(int(abs(gpu[k] - start[k]).max() > 0) for k in cpu if k not in moved)
    # With BatchNorm on batch statistics, some biases have a gradient of exactly zero in
    # theory (a per-channel shift that the next BatchNorm removes): Adam turns its rounding
    # noise into steps of ±lr, on each device differently. The `.weight` tensors and the
    # running statistics (a running mean in units of its channel's standard deviation)
    # show whether the layers agree.
    weights = max((abs(cpu[k] - gpu[k]).max() / abs(cpu[k]).max(), k)
                  for k in cpu if k.endswith(".weight"))
    means = [(abs(cpu[k] - gpu[k]).max() / (cpu[k[:-4] + "var"].min() + 1e-5) ** 0.5, k)
             for k in cpu if k.endswith(".running_mean")]
    variances = [(abs(cpu[k] - gpu[k]).max() / abs(cpu[k]).max(), k)
                 for k in cpu if k.endswith(".running_var")]
    print(f"weights, {cpu_run} vs {gpu_run} ({what}):",
          json.dumps({"tensors": len(cpu), "same_names": sorted(cpu) == sorted(gpu),
                      "worst_relative_difference": float(worst[0]), "worst_tensor": worst[1],
                      "tensors_trained": len(moved),
                      "worst_update_difference": float(worst_update[0]),
                      "worst_update_tensor": worst_update[1],
                      "frozen_on_cpu_but_changed": unmoved,
                      "worst_weight_difference": float(weights[0]), "worst_weight": weights[1],
                      "worst_running_mean_in_stds": float(max(means)[0]) if means else None,
                      "worst_running_var_difference":
                          float(max(variances)[0]) if variances else None}))
for run in ("cpu", f"{b}-f32", f"{b}-bf16"):
    try:
        lines = [json.loads(l) for l in open(f"{work}/out-{run}/metrics.jsonl")]
    except OSError as error:
        print(run, error)
        continue
    keys = ("loss", "val_loss", "val_accuracy", "data_wait_share")
    print(f"last epoch, {run}:", json.dumps({k: lines[-1].get(k) for k in keys}))
for d in ("cpu", gpu_device):
    try:
        report = json.load(open(f"{stages}/{b}-evaluate-on-{d}.out"))
        print(f"evaluate the {b} model (the first of PRECISIONS) on {d}:",
              json.dumps({k: report.get(k) for k in ("loss", "accuracy", "auc")}))
    except (OSError, ValueError) as error:
        print(f"evaluate on {d}: {error}")
EOF
}

# throughput B BINARY: `lanner bench` in the rows of the issue's table.
throughput() {
  local b=$1 bin=$2
  export LANNER_KERNEL_CACHE=$WORK/kernels-$b-large
  local arch batch steps
  for arch in mobilenet_v3_large xception; do
    for batch in 32 256; do
      for precision in $PRECISIONS; do
        steps=10
        [ "$batch" = 256 ] && steps=5
        stage "$b-${arch%%_*}-b$batch-$precision" 90 "$bin" bench --arch "$arch" \
          --batch-size "$batch" --steps "$steps" --warmup 2 --device "$GPU" --json \
          --precision "$precision" --step frozen --step fine-tune --step full --step inference
      done
    done
  done
}

# syncs BINARY: operations that make the `torch` build's host wait for the GPU.
syncs() {
  local bin=$1
  # Operations that made the host wait for the GPU in 1 + 2 + 32 steps of each kind, where
  # the steps read their logits back 4 times (after the first step, after the warm-up, every
  # 16 timed steps): libtorch warns once for each (LANNER_CUDA_SYNC_DEBUG).
  local sync_precision
  for sync_precision in f32 bf16; do
    LANNER_CUDA_SYNC_DEBUG=warn TORCH_SHOW_CPP_STACKTRACES=1 stage "torch-syncs-$sync_precision" 60 \
      "$bin" bench --arch mobilenet_v3_small_050 --image-size 64 --batch-size 8 --steps 32 \
      --warmup 2 --device "$GPU" --json --precision "$sync_precision" --step fine-tune --step full
    log "   torch-syncs-$sync_precision: $(grep -c 'called a synchronizing' "$STAGES/torch-syncs-$sync_precision.err") synchronising operations in 2 x 35 steps"
  done
}

# from_files BINARY: `lanner train` from image files, where the loader's workers decode each
# batch every epoch (`--no-cache`) and it is copied to the GPU, with the copy on a stream of its own (overlapping the step
# before) and on the compute stream. `lanner bench` reuses one batch on the device.
from_files() {
  local bin=$1 copy_stream
  "$SHAPES" "$WORK/large" --per-class 1024 --size 224x224 --seed 4 >/dev/null
  for copy_stream in $COPY_STREAMS; do
    LANNER_COPY_STREAM=$copy_stream stage "torch-train-mobilenet-b256-bf16-copy-stream-$copy_stream" \
      90 "$bin" train --train "$WORK/large/train" \
      --validation "$WORK/large/validation" --arch mobilenet_v3_large --image-size 224 \
      --batch-size 256 --weights none --initial-epochs 1 --fine-tune-epochs 3 \
      --fine-tune-layer 0 --precision bf16 --device "$GPU" --overwrite --no-cache \
      --model-dir "$WORK/large-model-$copy_stream" --output-data-dir "$WORK/large-out-$copy_stream"
    [ -f "$WORK/large-out-$copy_stream/metrics.jsonl" ] && python3 -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("   epoch", r.get("epoch"), r.get("phase"), "%.0f images/s" % r["train_images_per_second"],
          "waited for data %.0f%%" % (100 * r["data_wait_share"]))' \
      "$WORK/large-out-$copy_stream/metrics.jsonl" 2>&1 | tee -a "$OUT/log.txt"
  done
}

# batch_norm_kernels BINARY: the `full` step (BatchNorm on batch statistics) with ATen's own
# BatchNorm kernels instead of those PyTorch's `batch_norm` chooses (the default: cuDNN's on
# NVIDIA GPUs, mostly), next to the same rows of the table.
batch_norm_kernels() {
  local bin=$1 precision
  for precision in f32 bf16; do
    LANNER_BATCH_NORM_KERNELS=aten stage "torch-mobilenet-b256-$precision-aten-batch-norm" 60 \
      "$bin" bench --arch mobilenet_v3_large --batch-size 256 --steps 5 --warmup 2 \
      --device "$GPU" --json --precision "$precision" --step full
  done
}

# switches BINARY: the `torch` build with its memory order (default NCHW for f32 on a GPU,
# channels-last for bf16), logit readback (default every 16th step) and fused layers switched
# from their defaults.
switches() {
  local bin=$1 arch batch
  for arch in mobilenet_v3_large xception; do
    LANNER_MEMORY_FORMAT=channels-last stage "torch-${arch%%_*}-b256-f32-channels-last" 60 \
      "$bin" bench --arch "$arch" --batch-size 256 --steps 5 --warmup 2 \
      --device "$GPU" --json --precision f32 --step fine-tune --step full
    LANNER_MEMORY_FORMAT=nchw stage "torch-${arch%%_*}-b256-bf16-nchw" 60 \
      "$bin" bench --arch "$arch" --batch-size 256 --steps 5 --warmup 2 \
      --device "$GPU" --json --precision bf16 --step fine-tune --step full
  done
  LANNER_READBACK_EVERY=1 stage torch-mobilenet-b32-bf16-readback-every-step 60 \
    "$bin" bench --arch mobilenet_v3_large --batch-size 32 --steps 10 --warmup 2 \
    --device "$GPU" --json --precision bf16 --step frozen --step full
  # BatchNorm, hard swish, hard sigmoid and pooling as burn's composites, and each
  # convolution gradient from its own call, instead of one ATen operation each way
  # (lanner_models::fused).
  for batch in 32 256; do
    LANNER_FUSED_LAYERS=off stage "torch-mobilenet-b$batch-bf16-composite-layers" 60 \
      "$bin" bench --arch mobilenet_v3_large --batch-size "$batch" --steps 5 \
      --warmup 2 --device "$GPU" --json --precision bf16 --step fine-tune --step full \
      --step inference
  done
}

LANNER_TORCH=
if [ -x "$TORCH_BIN" ]; then
  # The `torch` build loads the GPU machine's own PyTorch libraries (and the NVIDIA libraries
  # its wheel depends on).
  TORCH_LIB=${TORCH_LIB:-$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')}
  for lib in "$(dirname "$(dirname "$TORCH_LIB")")"/nvidia/*/lib "$(dirname "$(dirname "$TORCH_LIB")")"/nvidia/cu13/lib; do
    [ -d "$lib" ] && TORCH_LIB=$TORCH_LIB:$lib
  done
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' \
    "$TORCH_LIB" "$(realpath "$TORCH_BIN")" >"$WORK/lanner-torch"
  chmod +x "$WORK/lanner-torch"
  LANNER_TORCH=$WORK/lanner-torch
  stage torch-libraries 20 bash -c "LD_LIBRARY_PATH=$TORCH_LIB ldd $(realpath "$TORCH_BIN") | grep -E 'torch|not found|cud'"
fi
# In the order of what matters most (see the top), or of SECTIONS.
TORCH_OK=0
CUDA_OK=0
for section in $SECTIONS; do
  case $section in
    cold)
      [ -n "$LANNER_TORCH" ] && cold_start torch "$LANNER_TORCH" 60 && TORCH_OK=1 ;;
    correct)
      [ "$TORCH_OK" = 1 ] && check_build torch "$LANNER_TORCH" ;;
    table)
      [ "$TORCH_OK" = 1 ] && throughput torch "$LANNER_TORCH" ;;
    batch-norm)
      [ "$TORCH_OK" = 1 ] && batch_norm_kernels "$LANNER_TORCH" ;;
    peer)
      # Its bf16 `full` steps spend 18-28 s in their first step (cuDNN's benchmark mode).
      stage torch-peer 240 python3 bench/gpu_torch.py $PEER_ARGS ;;
    files)
      [ "$TORCH_OK" = 1 ] && from_files "$LANNER_TORCH" ;;
    cuda)
      [ -x "$BIN" ] && cold_start cuda "$BIN" 100 && CUDA_OK=1 ;;
    extras)
      [ "$TORCH_OK" = 1 ] && syncs "$LANNER_TORCH" && switches "$LANNER_TORCH" ;;
    cuda-all)
      [ "$CUDA_OK" = 1 ] && check_build cuda "$BIN" && throughput cuda "$BIN" ;;
    *) log "unknown section $section" ;;
  esac
done
[ -x "$UNFUSED" ] && LANNER_KERNEL_CACHE=$WORK/kernels-unfused \
  stage unfused-cold 100 "$UNFUSED" "${SMALL[@]}"
log "done"
