#!/usr/bin/env bash
# The CUDA checks of the project in one pass (about 6.5 minutes on one H100 before the micro-batching
# and faster-step rows 2b/2c were added; up to 12 with them; on one H200 everything but bench_faster took
# 9 minutes), for a lent GPU
# machine without network access; every command runs under `timeout` inside one overall budget.
#
#   1. hardware and versions
#   2. benchmarks/bench_train.py at the paper's configuration (256 px, batch 128 or the largest
#      that fits, ResNet G width 64 x 9 blocks, PatchGAN 64, ViT-L/14-sized CLIP with random
#      weights): fp32 baseline, bf16, fp16, channels-last, cached source embeddings, trainable
#      encoder, compile, all on; images/s and the fraction of the card's bf16 peak
#   2b. exact micro-batching (--micro-batch) at the paper's configuration under a 24 GiB cap
#      (torch.cuda.set_per_process_memory_fraction): img/s for M = 128 (off), 32, 16, and the peak
#      GiB of one step per M without the cap (one child process each)
#   2c. faster-step candidates, one row each: encoder weights stored in bf16, fused Adam, both
#      with cached source embeddings, torch.compile max-autotune, CUDA graphs (reduce-overhead)
#   3. reference/train.py on a tiny image folder: 20 steps with --amp fp16 (GradScaler), and 20 steps
#      with --amp bf16 --compile --channels-last under TORCH_LOGS=recompiles (no recompilation
#      after the first step)
#   4. benchmarks/bench_loss.py and benchmarks/bench_encoder.py on CUDA
#
# Logs go to $OUT/*.txt (8 files at most) and to stdout; a summary ends the output.
#
#   OUT=/some/folder bash benchmarks/gpu_checks.sh          # on the GPU machine, from the repo root
#   bash benchmarks/gpu_checks.sh --dry-run                 # the same commands on CPU, tiny sizes
#
# Environment: PYTHON (default: python, else python3), OUT (default ./gpu_checks_out),
# BUDGET seconds for everything (default 720; each step's timeout is cut to what is left),
# ONLY: the step names to run, e.g. ONLY="info bench_micro bench_micro_memory bench_faster" (about 7 min).
set -u -o pipefail
cd "$(dirname "$0")/.."

SCRIPT="$PWD/benchmarks/gpu_checks.sh"
SUB=""  # internal: `--sub FUNCTION ARGS...` runs one function of this file (so that `timeout` can run it)
if [ "${1:-}" = "--dry-run" ]; then export GPU_CHECKS_DRY=1; fi
if [ "${1:-}" = "--sub" ]; then SUB=$2; shift 2; fi
DRY="${GPU_CHECKS_DRY:-0}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export OUT="${OUT:-$PWD/gpu_checks_out}"
BUDGET="${BUDGET:-720}"
ONLY="${ONLY:-}"  # space-separated step names to run (e.g. "info bench_micro bench_faster"); empty: all
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # retries after out-of-memory errors fit better
STARTED=$SECONDS
SUMMARY=""

# step NAME CAP_SECONDS COMMAND...: run under timeout (CAP, or what is left of BUDGET), log to $OUT/NAME.txt
step() {
    local name=$1 cap=$2
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        echo "=== $name: not in ONLY" > "$OUT/$name.txt"
        return 0
    fi
    local left=$((BUDGET - (SECONDS - STARTED)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        echo "=== $name: skipped, ${left}s of the budget left" | tee "$OUT/$name.txt"
        SUMMARY+="$name: SKIPPED (budget)"$'\n'
        return 0
    fi
    echo "=== $name (timeout ${limit}s): $*"
    local began=$SECONDS
    if [ "$(type -t "$1")" = "function" ]; then set -- bash "$SCRIPT" --sub "$@"; fi
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    local verdict="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMEOUT"; elif [ "$rc" -ne 0 ]; then verdict="FAILED rc=$rc"; fi
    echo "=== $name: $verdict after $((SECONDS - began))s (total $((SECONDS - STARTED))s)"
    SUMMARY+="$name: $verdict, $((SECONDS - began))s"$'\n'
    return 0
}

if [ "$DRY" -eq 1 ]; then
    DEVICE=cpu
    BENCH_TRAIN=(--device cpu --preset tiny --rows baseline bf16 bf16+channels-last bf16+cached bf16+trainable
                 bf16+channels-last+compile all --steps 2 --rounds 1 --warmup 1 --compile-warmup 2)
    SMOKE_FP16=(--amp bf16)  # float16 autocast needs CUDA: the dry run checks the rest of the command
    SMOKE=(--size 64 --batch-size 4 --g-width 16 --g-blocks 2 --d-width 16 --steps 4 --log-every 2 --sample-every 4 --checkpoint-every 4)
    BENCH_LOSS=(--device cpu --n 32 128 --d 64 --repeats 2)
    BENCH_ENCODER=(--device cpu --hidden 32 --layers 1 --heads 2 --patch 8 --image-size 32 --input-size 64 --batch 4 --warmup 1 --repeats 2)
    BENCH_MICRO=(--device cpu --preset tiny --batch-size 8 --rows bf16 bf16+mb4 bf16+mb2 --steps 2 --rounds 1 --warmup 1)
    BENCH_MICRO_MEMORY=(--device cpu --preset tiny --batch-size 8 --rows baseline --memory 0 4 2 --steps 2)
    BENCH_FASTER=(--device cpu --preset tiny --rows bf16 bf16+bf16-weights fused-adam bf16+cached+bf16-weights+fused-adam
                  --steps 2 --rounds 1 --warmup 1)
    CAP_TRAIN=600 CAP_SMOKE=300 CAP_LOSS=120 CAP_ENCODER=120 CAP_MICRO=300 CAP_FASTER=300
    BUDGET=2400
else
    DEVICE=cuda
    BENCH_TRAIN=(--device cuda --preset paper --rows baseline bf16 fp16 bf16+channels-last bf16+cached bf16+trainable
                 all bf16+channels-last+compile --steps 5 --row-seconds 6 --warmup 2 --compile-warmup 3)
    SMOKE_FP16=(--amp fp16)
    SMOKE=(--size 64 --batch-size 16 --g-width 32 --g-blocks 2 --d-width 32 --steps 20 --log-every 10 --sample-every 20 --checkpoint-every 20)
    BENCH_LOSS=(--device cuda --n 128 512 2048 --d 1024)
    BENCH_ENCODER=(--device cuda --hidden 1024 --layers 24 --heads 16 --patch 14 --image-size 224 --input-size 256 --batch 64 --warmup 2 --repeats 5)
    BENCH_MICRO=(--device cuda --preset paper --memory-fraction-gib 24 --rows bf16 bf16+mb32 bf16+mb16
                 bf16+cached+mb16 --steps 5 --row-seconds 6 --warmup 2)
    BENCH_MICRO_MEMORY=(--device cuda --preset paper --rows bf16 --memory 0 32 16 --steps 2)
    BENCH_FASTER=(--device cuda --preset paper --rows bf16 bf16+bf16-weights bf16+fused-adam
                  bf16+channels-last+cached+bf16-weights+fused-adam bf16+channels-last+autotune
                  bf16+channels-last+cudagraphs --steps 5 --row-seconds 6 --warmup 2 --compile-warmup 3)
    CAP_TRAIN=240 CAP_SMOKE=75 CAP_LOSS=50 CAP_ENCODER=90 CAP_MICRO=110 CAP_FASTER=200  # encoder: 50 s timed out on an H200
fi

info() {
    date -u
    nvidia-smi -L || echo "(no nvidia-smi)"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv || true
    echo "CPU cores: $(nproc); PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF"
    "$PY" - <<'EOF'
import sys, torch, transformers
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, transformers {transformers.__version__}")
for name in ("numpy", "triton", "tqdm", "scipy"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.get_device_name(0)}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
import travel_loss, reference.train  # the repository imports
print("imports ok:", travel_loss.__file__)
EOF
}

# A CLIP vision config with no weights: --encoder-mode random-clip builds a small random encoder from it.
tiny_clip() {
    "$PY" -c "
from transformers import CLIPVisionConfig
CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=8, projection_dim=32).save_pretrained('$WORK/tiny_clip')"
}

# A CycleGAN-layout data root of 64 px PNGs (coloured rectangles, bright in A, dark in B) for the smoke runs.
tiny_data() {
    "$PY" -c "
import numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for side, low in (('A', 128), ('B', 0)):
    folder = Path('$WORK/data') / f'train{side}'
    folder.mkdir(parents=True)
    for index in range(64):
        pixels = np.empty((64, 64, 3), np.uint8)
        pixels[:] = rng.integers(low, low + 128, 3)
        for _ in range(3):
            top, left, height, width = rng.integers(0, 48, 4)
            pixels[top : top + height + 4, left : left + width + 4] = rng.integers(low, low + 128, 3)
        Image.fromarray(pixels).save(folder / f'{index:03d}.png')"
}

# train.py smoke: the run, then its last metrics line, which must be finite.
smoke() {
    local out=$1
    shift
    "$PY" reference/train.py --data "$WORK/data" --num-workers 0 --device "$DEVICE" --encoder-mode random-clip \
        --encoder "$WORK/tiny_clip" --lambda-travel 0.1 --out "$out" "${SMOKE[@]}" "$@" || return $?
    "$PY" - "$out/metrics.jsonl" <<'EOF'
import json, math, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
last = records[-1]
print("last metrics:", json.dumps(last))
bad = [k for k, v in last.items() if isinstance(v, float) and not math.isfinite(v)]
print("finite losses: " + ("NO " + str(bad) if bad else "yes"))
sys.exit(1 if bad else 0)
EOF
}

compile_smoke() {
    TORCH_LOGS=recompiles smoke "$WORK/smoke_compile" --amp bf16 --compile --channels-last 2>&1 | tee "$WORK/compile.log"
    local rc=${PIPESTATUS[0]}
    local recompiles
    recompiles=$(grep -c "Recompiling function" "$WORK/compile.log" || true)
    echo "recompilations logged (TORCH_LOGS=recompiles, whole run, first step included): ${recompiles:-0}"
    if grep -q "recompiled after the first step" "$WORK/compile.log"; then
        echo "RECOMPILED AFTER THE FIRST STEP (see the warning above)"
        return 3
    fi
    echo "no recompilation after the first step (the trainer's graph count did not change)"
    return $rc
}

encoder_bench() {
    if [ ! -f benchmarks/bench_encoder.py ] || ! "$PY" benchmarks/bench_encoder.py --help | grep -q -- "--device"; then
        echo "benchmarks/bench_encoder.py missing or without --device: skipped"
        return 0
    fi
    "$PY" benchmarks/bench_encoder.py "${BENCH_ENCODER[@]}"
}

if [ -n "$SUB" ]; then
    "$SUB" "$@"
    exit $?
fi

mkdir -p "$OUT"
export WORK="$(mktemp -d)"  # trainer outputs (checkpoints, samples) stay out of $OUT
step info 60 info
tiny_clip
tiny_data
step train_fp16 "$CAP_SMOKE" smoke "$WORK/smoke_fp16" "${SMOKE_FP16[@]}"
step bench_train "$CAP_TRAIN" "$PY" benchmarks/bench_train.py "${BENCH_TRAIN[@]}" --json "$OUT/bench_train.json"
step bench_micro "$CAP_MICRO" "$PY" benchmarks/bench_train.py "${BENCH_MICRO[@]}"
step bench_micro_memory "$CAP_MICRO" "$PY" benchmarks/bench_train.py "${BENCH_MICRO_MEMORY[@]}"
step bench_faster "$CAP_FASTER" "$PY" benchmarks/bench_train.py "${BENCH_FASTER[@]}"
step train_bf16_compile "$CAP_SMOKE" compile_smoke
step bench_loss "$CAP_LOSS" "$PY" benchmarks/bench_loss.py "${BENCH_LOSS[@]}"
step bench_encoder "$CAP_ENCODER" encoder_bench

{
    echo
    echo "===================== summary ($((SECONDS - STARTED))s, device $DEVICE) ====================="
    printf '%s' "$SUMMARY"
    echo "--- bench_train"
    grep -E "^(training iteration|torch |[0-9]+ px|median of|row |---|baseline|bf16|fp16|all|compile|channels|cached|trainable)" "$OUT/bench_train.txt" || true
    echo "--- micro-batching (24 GiB cap) and peak memory per micro-batch size"
    grep -E "^(memory capped|row |---|bf16|micro-batch|-+$|\s+(off|[0-9]+) )" "$OUT/bench_micro.txt" "$OUT/bench_micro_memory.txt" || true
    echo "--- faster-step candidates"
    grep -E "^(row |bf16|fused)" "$OUT/bench_faster.txt" || true
    echo "--- train.py smokes"
    grep -hE "^(done:|finite losses|recompilations logged|no recompilation|RECOMPILED)" "$OUT/train_fp16.txt" "$OUT/train_bf16_compile.txt" || true
} | tee "$OUT/summary.txt"
rm -rf "$WORK"
