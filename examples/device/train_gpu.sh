#!/bin/bash
# Training on a GPU machine without network access (docs/training.md, "Scaling up"):
#   bash examples/device/train_gpu.sh MINUTES CONFIG [CONFIG ...]
# Unpacks the trimmed PySCF bundle (gpu/pyscf_trim.tar.xz, made by make_pyscf_bundle.sh; the
# machine has torch but no PySCF and no registry), builds the grid cache of data/ if missing
# (16 processes), then trains every CONFIG at once on the one GPU for MINUTES of wall time
# (run_minutes; each resumes from its checkpoint when the machine is still warm) and copies
# each run's best model and history to $OUT/<run>/.
set -u -o pipefail
MIN=$1; shift
sum=$(md5sum gpu/pyscf_trim.tar.xz | cut -d' ' -f1)
if [ "$(cat /tmp/site/.bundle 2>/dev/null)" != "$sum" ]; then   # none yet, or another bundle
    rm -rf /tmp/site && mkdir -p /tmp/site && tar -xJf gpu/pyscf_trim.tar.xz -C /tmp/site \
        && echo "$sum" > /tmp/site/.bundle || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
DATA="data=['../data/qm9_pbe_def2svp_*.h5']"
t0=$(date +%s)
python3 -m pyscf_densr.cli train "$1" --set "$DATA" --build-cache --workers 16 2>&1 | tail -2 || exit 1
echo "cache ready after $(( $(date +%s) - t0 )) s"
pids=()
for cfg in "$@"; do
    name=$(basename "$cfg" .yaml)
    python3 -m pyscf_densr.cli train "$cfg" --set "$DATA" "run_minutes=$MIN" \
        > "${OUT:-/tmp}/log_$name.txt" 2>&1 &
    pids+=($!)
done
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait "${pids[@]}"
echo "trained after $(( $(date +%s) - t0 )) s"
for cfg in "$@"; do
    out=$(python3 -c "import sys; from pyscf_densr import train; c = train.load_config(sys.argv[1]); print(train._path(c, c['out']))" "$cfg")
    name=$(basename "$out")
    mkdir -p "${OUT:-/tmp}/$name" && cp "$out"/best.pt "$out"/best.json "$out"/history.jsonl "${OUT:-/tmp}/$name/"
    tail -1 "$out"/history.jsonl
done
