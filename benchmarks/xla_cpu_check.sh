#!/usr/bin/env bash
# The reference trainer on torch_xla, run for real on the CPU PJRT device (no TPU needed):
#   1. its own virtual environment with torch + torch_xla (the same version, from the package index;
#      on Linux torch's wheel pulls CUDA libraries, about 3 GB, once);
#   2. a few steps of reference/train.py with --device xla --amp off on the digit study's data, a
#      checkpoint, then --resume to more steps, compared with the same run uninterrupted;
#   3. reference/translate.py on the resumed checkpoint, on the XLA device;
#   4. torch_xla's metrics: graphs compiled per step (warm-up graphs, then none new per step).
# Not part of CI (the install is large). Usage: benchmarks/xla_cpu_check.sh [STEPS]
#   XLA_VERSION (default 2.9.0), XLA_VENV (default ~/.cache/travel-loss/xla-VERSION), XLA_WORK (a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${XLA_VERSION:-2.9.0}
venv=${XLA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/travel-loss/xla-$version}
work=${XLA_WORK:-$(mktemp -d)}
steps=${1:-8}
half=$((steps / 2))

if [ ! -f "$venv/.ready" ]; then
    echo "+ virtual environment $venv: torch==$version torch_xla==$version"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "torch==$version" "torch_xla==$version"
    "$venv/bin/python" -m pip install -q -e '.[trainer-deps]' "torch==$version"
    touch "$venv/.ready"
fi
py="$venv/bin/python"
export PJRT_DEVICE=CPU PYTHONPATH=. PYTHONWARNINGS="default::UserWarning"
"$py" -c 'import torch, torch_xla; print("torch", torch.__version__, "| torch_xla", torch_xla.__version__, "|", torch_xla.device())'

echo "+ data: the digit study's domains (seed 0, 16 px) in $work/data"
"$py" - "$work/data" <<'EOF'
import sys
from pathlib import Path

from reference.studies.digit_data import digit_domains
from reference.studies.digits import _write_folder

domains = digit_domains(seed=0, size=16)
_write_folder(domains.a_train, Path(sys.argv[1]) / "trainA")
_write_folder(domains.b, Path(sys.argv[1]) / "trainB")
EOF

# One trainer run in this process, reference.train.main as the command line calls it; after every
# step the count of XLA compilations so far (torch_xla.debug.metrics' CompileTime) is recorded.
cat >"$work/run_counted.py" <<'EOF'
import json
import sys

import torch_xla.debug.metrics as metrics

from reference import train

compiles: list[int] = []
step = train.TrainingRun.step


def counted(self, real_a, real_b):
    out = step(self, real_a, real_b)
    compiles.append((metrics.metric_data("CompileTime") or (0,))[0])
    return out


train.TrainingRun.step = counted
code = train.main(sys.argv[2:])
with open(sys.argv[1], "w") as answer:
    json.dump({"code": code, "compiles_after_each_step": compiles}, answer)
sys.exit(code)
EOF

flags=(--preset digits-demo --data-a "$work/data/trainA" --data-b "$work/data/trainB" --device xla --amp off
    --encoder-mode module --encoder reference/studies/digit_data.py:stroke_embedder --lambda-travel 3
    --batch-size 8 --log-every 1 --sample-every "$steps" --checkpoint-every "$half")
warnings="$work/warnings.txt"
: >"$warnings"
run() {  # run NAME ARGS...: one counted trainer run, its log in $work/NAME.log
    name=$1
    shift
    echo "+ train.py ${*: -4} ($name)"
    "$py" "$work/run_counted.py" "$work/$name.json" "${flags[@]}" "$@" >"$work/$name.log" 2>&1 || {
        tail -20 "$work/$name.log"
        exit 1
    }
    grep -i -E 'warn|deprecat' "$work/$name.log" >>"$warnings" || true
    "$py" -c 'import json, sys; r = json.load(open(sys.argv[1])); print("  compiles after each step:", r["compiles_after_each_step"])' "$work/$name.json"
}
run first_half --steps "$half" --out "$work/resumed"
run resume --steps "$steps" --out "$work/resumed" --resume
run uninterrupted --steps "$steps" --out "$work/whole"

echo "+ resumed against uninterrupted: generator weights"
"$py" - "$work/resumed/latest.pt" "$work/whole/latest.pt" <<'EOF'
import sys

import torch

a, b = (torch.load(path, map_location="cpu", weights_only=True)["generator"] for path in sys.argv[1:])
worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
print(f"  {len(a)} tensors, largest difference {worst:.3g}", "(bit-identical)" if worst == 0 else "")
EOF

echo "+ translate.py on the XLA device"
"$py" reference/translate.py --checkpoint "$work/resumed/latest.pt" --input "$work/data/trainA" \
    --output "$work/translated" --device xla --no-progress 2>&1 | tail -3 | sed 's/^/  /'
ls "$work/translated" | wc -l | sed 's/^/  translated images: /'
echo "+ warnings in the trainer logs (expected none):"
sort -u "$warnings" | sed 's/^/  /'
echo "xla check done in $work"
