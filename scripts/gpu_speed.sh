#!/usr/bin/env bash
# Every GPU speed measurement of issue 4 in one run, ending in one table (estimated ~4 min on an H100;
# each step has a time limit, see step()); not yet run on a GPU.
#   PYTHONPATH=. bash scripts/gpu_speed.sh .gpu/cifar10-jpeg
#   SMOKE=1 PYTHONPATH=. bash scripts/gpu_speed.sh DIR     # tiny settings on the CPU: does it run?
# 1. benchmark.py at batch 64, fp32, the seed recipe's data (no normalization/augmentation): a, b, c, d
# 2. benchmark.py at batch 512, bf16-mixed, channels_last, project data defaults; 3. the same compiled
# 4. the seed recipe (configs/seed.yaml: seed net, batch 64, 20 epochs, validation each epoch), timed
# 5. a fast recipe: seed_bn, batch 512, bf16-mixed, channels_last, one-cycle to lr 1e-2, weight decay 5e-2
#    (as the H100 sweep's b5 run at batch 256), 15 epochs: training seconds until the seed's best val/acc
# Logs and JSON results go to $OUT (or a temporary folder); the summary table comes last.
set -euo pipefail
DATA=${1:?usage: scripts/gpu_speed.sh DATA_DIR}
LOG=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
mkdir -p "$LOG"
BENCH=(scripts/benchmark.py --data-dir "$DATA")
if [[ -n "${SMOKE:-}" ]]; then  # every step, a few batches each, on the CPU
  DEV=cpu; B64=(--rounds 1 --steps 2 --warmup 1); B512=("${B64[@]}")
  RECIPE=(--set trainer.limit_train_batches=3 trainer.limit_val_batches=2 trainer.max_epochs=2)
  FAST_EPOCHS=2
else
  DEV=cuda; B64=(--rounds 3 --steps 200 --warmup 20); B512=(--rounds 2 --steps 40 --warmup 10)
  RECIPE=(); FAST_EPOCHS=${FAST_EPOCHS:-15}
fi
FAST=(model.net=seed_bn data.batch_size=512 trainer.precision=bf16-mixed model.channels_last=true
      model.schedule=onecycle model.lr=1e-2 model.weight_decay=5e-2 model.label_smoothing=0.1
      data.normalize=true data.augment=true trainer.max_epochs=$FAST_EPOCHS)
export PYTHONUNBUFFERED=1
T=${SMOKE:+10}; T=${T:-1}  # each step's time limit: its GPU estimate x 2, or x 20 for the CPU smoke run

step() {  # step NAME SECONDS COMMAND...: run it (at most SECONDS), output to the screen and $LOG/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  set +e  # a failed or timed-out step is reported, and the others still run
  timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log" | grep -v -e "it/s" -e "Warning" -e "warnings.warn"
  local rc=${PIPESTATUS[0]}
  set -e
  echo "=== $name: exit $rc, $((SECONDS - start)) s" | tee -a "$LOG/times.txt"
}

{ nvidia-smi -L || true; $PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } \
  | tee "$LOG/env.txt"
step decode "$((T * 60))" $PY -c "from lit_cifar.sources import load; load('$DATA')"  # once, so later steps load the cache
step bench_b64 "$((T * 60))" $PY "${BENCH[@]}" --device $DEV --batch-size 64 --precision 32 "${B64[@]}" \
  --set data.normalize=false data.augment=false --out "$LOG/bench_b64.json"
step bench_b512 "$((T * 60))" $PY "${BENCH[@]}" --device $DEV --batch-size 512 --precision bf16-mixed --channels-last \
  "${B512[@]}" --out "$LOG/bench_b512.json"
step bench_b512_compile "$((T * 120))" $PY "${BENCH[@]}" --device $DEV --batch-size 512 --precision bf16-mixed \
  --channels-last --compile "${B512[@]}" --out "$LOG/bench_b512_compile.json"
step seed_recipe "$((T * 100))" $PY "${BENCH[@]}" --device $DEV --recipe configs/seed.yaml "${RECIPE[@]}" \
  --out "$LOG/seed_recipe.json"
step fast_recipe "$((T * 60))" $PY "${BENCH[@]}" --device $DEV --recipe configs/seed.yaml --set "${FAST[@]}" \
  "${RECIPE[@]}" --out "$LOG/fast_recipe.json"

$PY - "$LOG" <<'EOF' | tee "$LOG/summary.txt"
"""The one table: every number above, read back from the JSON files."""
import json, sys
from pathlib import Path

log = Path(sys.argv[1])
read = lambda name: json.loads((log / f"{name}.json").read_text()) if (log / f"{name}.json").exists() else None
print(f"\n{'=' * 100}\nGPU speed summary ({(log / 'env.txt').read_text().strip()})")
print(f"{'measurement (img/s; syncs: host-device syncs in c)':<58}{'a seed':>9}{'b plain':>9}{'c ours':>9}"
      f"{'d bare':>9}{'c/a':>6}{'c/b':>6}{'c/d':>6}  syncs")
for name, label in (
    ("bench_b64", "b64 fp32, seed data (no norm/aug)"),
    ("bench_b512", "b512 bf16 channels_last, norm+aug"),
    ("bench_b512_compile", "b512 bf16 channels_last, norm+aug, compile"),
):
    r = read(name)
    if r is None:
        print(f"{label:<58}(failed: see {name}.log)")
        continue
    med = r["median"]
    q = r["ratios"]
    syncs = f"{r['syncs']['total']}/{r['syncs']['steps']} steps" if r.get("syncs") else "-"
    print(f"{label:<58}{med['a']:>9.0f}{med['b']:>9.0f}{med['c']:>9.0f}{med['d']:>9.0f}"
          f"{q['c/a']:>6.1f}{q['c/b']:>6.2f}{q['c/d']:>6.2f}  {syncs}")
seed, fast = read("seed_recipe"), read("fast_recipe")
print(f"\n{'recipe':<58}{'fit s':>8}{'train s':>9}{'epochs':>8}{'best val/acc':>14}")
for r, label in ((seed, "seed recipe (configs/seed.yaml), val each epoch"), (fast, "fast recipe")):
    if r is None:
        print(f"{label:<58}(failed: see its log)")
        continue
    print(f"{label:<58}{r['fit_s']:>8.1f}{r['train_s']:>9.1f}{r['epochs']:>8}{r['val_acc_best']:>14.4f}")
if seed and fast:
    target, total = seed["val_acc_best"], 0.0
    for epoch, (t, acc) in enumerate(zip(fast["epoch_train_s"], fast["epoch_val_acc"]), 1):
        total += t
        if acc >= target:
            print(f"fast recipe reaches the seed's best val/acc {target:.4f} after epoch {epoch}: "
                  f"{total:.1f} s of training (val/acc {acc:.4f})")
            break
    else:
        print(f"fast recipe never reached the seed's best val/acc {target:.4f}")
    print(f"fast recipe settings: {fast['settings']}")
print(f"targets: seed recipe fit <= 60 s, b64 c/a >= 10, fast recipe at the seed's accuracy in <= 10 s")
EOF
cat "$LOG/times.txt"
