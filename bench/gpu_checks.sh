#!/usr/bin/env bash
# The GPU measurements the README's GPU rows need, in one call that fits a GPU box lent for a few
# minutes (each step has its own limit, so a slow one cannot eat the others' time):
#   1. the trainer against another train.py (upstream's) in the same call, warm and cold overhead
#   2. the harness scorer's cost per experiment (and how its model processes were confined, and how far
#      an honest model's logits moved under the probe: bf16 noise, for PROBE_ATOL)
#   3. that each buffer the scorer shares with a model process has its CUDA segment to itself
#   4. each GPU profile with the process's memory capped to its tier's card
#   5. CUDA inside the run's sandbox (user, mount and PID namespaces), and its start's cost
# Everything is printed and also written under $OUT (default ./gpu-out).
#
#   usage: bench/gpu_checks.sh DATA_DIR [OTHER_TRAIN_PY]
#   (DATA_DIR: a prepared data dir, e.g. from `nightlab prepare`; OTHER_TRAIN_PY: e.g. upstream
#    autoresearch's train.py, fetched separately, never copied into this repository)
set -uo pipefail
cd "$(dirname "$0")/.."
# absolute: the benches run in workspaces of their own
DATA=$(realpath "${1:?usage: bench/gpu_checks.sh DATA_DIR [OTHER_TRAIN_PY]}")
OTHER=${2:+$(realpath "$2")}
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_S COMMAND...: run it under a limit, tee its output, go on whatever it did
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

ls /dev/shm > "$OUT/shm-before.txt" 2>&1  # what the scorer's CUDA IPC leaves there: compared at the end
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" \
    2>&1 | tee -a "$OUT/gpu.txt"
step trainer 230 "$PY" bench/trainer.py --budget 40 --data-dir "$DATA" ${OTHER:+--other "$OTHER"} --log "$OUT/trainer.log"
step scoring 100 "$PY" bench/scoring.py --repeat 3 --profile default --data-dir "$DATA"
step ipc_segments 30 "$PY" bench/ipc_segments.py
step sandbox 20 "$PY" bench/sandbox.py --repeat 5 --cuda  # CUDA in the run's sandbox (no `Run sandbox:` line)
ls /dev/shm > "$OUT/shm-after.txt" 2>&1  # after the scorer's runs, before the profiles (which may be cut)
echo "== /dev/shm: $(comm -13 "$OUT/shm-before.txt" "$OUT/shm-after.txt" | wc -l) entries more than before the scorer's runs"
# last: it stops starting profiles at its deadline, and the call's 600 s end it at worst
step profiles 215 "$PY" bench/profiles_gpu.py --budget 20 --data-dir "$DATA" --deadline 200 --log-dir "$OUT/profiles"
