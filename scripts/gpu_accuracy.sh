#!/usr/bin/env bash
# Accuracy search (issue 16) on one GPU: an Optuna sweep per network (scripts/sweep.py), both at once,
# each trial a 20-epoch lit-cifar run on the 45,000/5,000 split of DATA_DIR (split seed 0).
#   bash scripts/gpu_accuracy.sh DATA_DIR [SECONDS] [JOBS] [EXTRA lit-cifar ARGS...]
# SECONDS (default 300): no trial starts after it; running trials finish (a 20-epoch run took
# 69-188 s with 12 at once on an H100, docs/sweeps/round1_h100.md): the defaults are meant to fit
# a 600 s device call (not yet run). JOBS (default 6): trials at once per network, 12 processes in all.
# Output under $OUT (or runs/): sweep-<net>/ with trials.md, best.yaml and tb/ (one run per trial),
# sweep-<net>.log. Run it again with the same $OUT to continue both studies.
set -u
DATA=${1:?data folder}; BUDGET=${2:-300}; JOBS=${3:-6}; shift 3 || shift $#
ROOT=${OUT:-runs}
mkdir -p "$ROOT"
python3 -c "from lit_cifar.data import CIFARDataModule as D; D('$DATA').prepare_data()"  # decode once: runs share the cache

start=$(date +%s)
for net in seed seed_bn; do
  OMP_NUM_THREADS=1 python3 scripts/sweep.py --data-dir "$DATA" --net "$net" --max-epochs 20 \
    --timeout "$BUDGET" --jobs "$JOBS" --study-name "$net" --output-dir "$ROOT/sweep-$net" \
    --data.val_size 5000 --trainer.accelerator gpu \
    --dashboard.inputs false --dashboard.feature_maps false "$@" > "$ROOT/sweep-$net.log" 2>&1 &
done
wait
echo "sweeps: $(( $(date +%s) - start )) s wall"
for net in seed seed_bn; do
  cat "$ROOT/sweep-$net/trials.md" || tail -3 "$ROOT/sweep-$net.log"
done
