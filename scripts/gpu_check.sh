#!/usr/bin/env bash
# The checks only a GPU can make, as one script for the first machine that has one (about 6 minutes on one GPU;
# each step is capped at 4 minutes). Prints one table: step, exit code, seconds, its last line; logs in $OUT.
#   tests/cuda                  sync-free device step (set_sync_debug_mode), nvJPEG, a short T run in bf16
#   doctor                      the doctor on recipes/t.yaml (the generated data stands in for ImageNet)
#   device_step                 kernels per micro-batch, images/s, host_syncs (the target is 0)
#   train_step / +compile       InceptionNeXt-T at 224, batch 128, bf16 and channels_last: this loop vs plain timm
# Without CUDA it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_check}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA on this machine: nothing to check (run scripts/gpu_check.sh where a GPU is)"
    exit 0
fi
mkdir -p "$OUT"
[ -f data/synth/train/manifest.json ] || "$PY" -m orchestrator.data synth data/synth > "$OUT/synth.log" 2>&1
echo "check|rc|seconds|last line" > "$OUT/table.txt"
check() {  # check NAME COMMAND...: run it (4 minutes at most) and add its row to the table
    local name=$1 start rc
    shift
    start=$(date +%s)
    timeout 240 "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name|$rc|$(( $(date +%s) - start ))|$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-150)" >> "$OUT/table.txt"
}
T_BENCH=(bench/train_step.py --model inception_next_tiny --size 224 --batch 128 --device cuda --rounds 3)
check tests_cuda "$PY" -m pytest -q -p no:cacheprovider tests/cuda
check doctor "$PY" -m orchestrator.doctor recipes/t.yaml --launcher local --seconds 3 \
    --set data.train=data/synth/train data.val=data/synth/val "run.storage=$OUT/runs"
check device_step "$PY" bench/device_step.py
check train_step "$PY" "${T_BENCH[@]}"
check train_step_compile "$PY" "${T_BENCH[@]}" --compile
"$PY" -c 'import torch; print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")'
column -t -s '|' "$OUT/table.txt" 2> /dev/null || tr '|' '\t' < "$OUT/table.txt"
awk -F '|' 'NR > 1 && $2 != 0 { failed = 1 } END { exit failed }' "$OUT/table.txt"   # non-zero if a check failed
