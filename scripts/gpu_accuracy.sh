#!/usr/bin/env bash
# Accuracy sweep (issue 8): every recipe of a recipe file trained at once, in parallel, on one GPU.
#   bash scripts/gpu_accuracy.sh docs/sweeps/round2.txt DATA_DIR [ACCELERATOR] [EXTRA lit-cifar ARGS...]
# A recipe file holds one run a line: a name, then `lit-cifar fit` arguments ('#' lines are comments).
# Each run logs to $OUT/accuracy/<name> (or runs/accuracy/<name>); the table of best and final
# val/acc per run is printed from those logs by scripts/plot_curves.py.
set -u
RECIPES=${1:?recipe file}; DATA=${2:?data folder}; ACC=${3:-gpu}; shift 3 || shift $#
ROOT=${OUT:-runs}/accuracy
mkdir -p "$ROOT"
python3 -c "from lit_cifar.sources import load; load('$DATA')"  # decode once, so runs share the cache

common=(--data.data_dir "$DATA" --trainer.accelerator "$ACC" --trainer.enable_progress_bar false
        --trainer.enable_model_summary false --data.val_size 5000)
start=$(date +%s)
n=0
while read -r name args; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  # shellcheck disable=SC2086 - the recipe's arguments are a list of words on purpose
  OMP_NUM_THREADS=1 timeout "${SWEEP_TIMEOUT:-420}" python3 -m lit_cifar.cli fit "${common[@]}" \
    --trainer.default_root_dir "$ROOT/$name" $args "$@" > "$ROOT/$name.log" 2>&1 &
  n=$((n + 1))
done < "$RECIPES"
wait
echo "sweep: $n runs in parallel, $(( $(date +%s) - start )) s wall"
python3 scripts/plot_curves.py "$ROOT" --output "$ROOT/curves.png"
