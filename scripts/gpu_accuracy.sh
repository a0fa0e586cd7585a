#!/usr/bin/env bash
# Accuracy sweep for the default and seed_bn recipes (issue 8), run in parallel on one GPU.
#   bash scripts/gpu_accuracy.sh DATA_DIR [ACCELERATOR] [EXTRA lit-cifar ARGS...]
# Writes each run's TensorBoard logs under $OUT/accuracy (or runs/accuracy), then prints the
# table of best and final val/acc from those logs (scripts/plot_curves.py).
set -u
DATA=${1:?data folder}; ACC=${2:-gpu}; shift; shift || true
ROOT=${OUT:-runs}/accuracy
mkdir -p "$ROOT"
python3 -c "from lit_cifar.sources import load; load('$DATA')"  # decode once, so runs share the cache

common=(--data.data_dir "$DATA" --trainer.accelerator "$ACC" --trainer.enable_progress_bar false
        --trainer.enable_model_summary false --data.val_size 5000)
onecycle=(--model.schedule onecycle --model.label_smoothing 0.1)
declare -A RUNS=(
  [s1-reflect]="--model.lr 2e-3 --model.weight_decay 5e-4 --data.padding_mode reflect ${onecycle[*]}"
  [s2-zeropad]="--model.lr 2e-3 --model.weight_decay 5e-4 ${onecycle[*]}"
  [s3-lr4e-3]="--model.lr 4e-3 --model.weight_decay 5e-4 --data.padding_mode reflect ${onecycle[*]}"
  [s4-bs128]="--data.batch_size 128 --model.lr 4e-3 --model.weight_decay 5e-4 --data.padding_mode reflect ${onecycle[*]}"
  [s5-wd5e-2]="--model.lr 2e-3 --model.weight_decay 5e-2 --data.padding_mode reflect ${onecycle[*]}"
  [s7-nols]="--model.lr 2e-3 --model.weight_decay 5e-4 --data.padding_mode reflect --model.schedule onecycle"
  [b1-probe]="--model.net seed_bn --model.lr 2e-3 --model.weight_decay 5e-4 ${onecycle[*]}"
  [b2-lr5e-3]="--model.net seed_bn --model.lr 5e-3 --model.weight_decay 5e-2 ${onecycle[*]}"
  [b3-bs128]="--model.net seed_bn --data.batch_size 128 --model.lr 5e-3 --model.weight_decay 5e-4 ${onecycle[*]}"
  [b4-bs128-lr1e-2]="--model.net seed_bn --data.batch_size 128 --model.lr 1e-2 --model.weight_decay 5e-2 ${onecycle[*]}"
  [b5-bs256]="--model.net seed_bn --data.batch_size 256 --model.lr 1e-2 --model.weight_decay 5e-2 ${onecycle[*]}"
  [b8-reflect]="--model.net seed_bn --data.batch_size 128 --model.lr 5e-3 --model.weight_decay 5e-2 --data.padding_mode reflect ${onecycle[*]}"
)
start=$(date +%s)
for name in "${!RUNS[@]}"; do
  # shellcheck disable=SC2086 - each recipe is a list of words on purpose
  OMP_NUM_THREADS=1 timeout "${SWEEP_TIMEOUT:-420}" python3 -m lit_cifar.cli fit "${common[@]}" \
    --trainer.default_root_dir "$ROOT/$name" ${RUNS[$name]} "$@" > "$ROOT/$name.log" 2>&1 &
done
wait
echo "sweep: ${#RUNS[@]} runs in parallel, $(( $(date +%s) - start )) s wall"
python3 scripts/plot_curves.py "$ROOT" --output "$ROOT/curves.png"
