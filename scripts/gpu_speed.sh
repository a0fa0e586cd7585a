#!/usr/bin/env bash
# Issue 15's GPU speed measurements in one run, alone on the GPU, ending in one table (~10 min on an
# H100, estimated: not yet run on a GPU; each step has a time limit, see step()).
#   PYTHONPATH=. bash scripts/gpu_speed.sh DATA_DIR
#   SMOKE=1 PYTHONPATH=. bash scripts/gpu_speed.sh DATA_DIR   # every step, a few batches, on the CPU (5-16 min)
# Needs torch, torchvision, lightning, torchmetrics, tensorboard, and these wheels (WHEELS=DIR installs
# them from DIR with pip --no-index): jsonargparse docstring-parser typeshed-client typing-extensions
# matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six.
#  1-4. scripts/benchmark.py a/b/c/d: batch 64 fp32, and batch 512 bf16-mixed, each without and with
#       --compile (project defaults: channels_last, normalization, crop and flip)
#  sync. tests/test_speed.py on the GPU (when pytest is installed): no host-device sync in a step
#  5.   the seed recipe exactly: scripts/train.py --accelerator gpu --config configs/seed.yaml (20
#       epochs, validation each epoch, then the test): wall time
#  6.   a fast recipe (seed_bn, batch 512, bf16-mixed, one-cycle to lr 1e-2, 20 epochs): seconds of
#       training until val/acc first reaches the seed recipe's best (66.5%), and val/acc after 20 epochs
#  7-8. the default recipe and configs/seed_bn.yaml through scripts/train.py: wall time each
# The data is decoded into its cache first (step 0), so every timed run starts from the cache.
# Logs and JSON results go to $OUT (or a temporary folder); the table comes last.
set -euo pipefail
DATA=${1:?usage: scripts/gpu_speed.sh DATA_DIR}
LOG=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
mkdir -p "$LOG"
: > "$LOG/times.tsv"
if [[ -n "${WHEELS:-}" ]]; then
  $PY -m pip install -q --no-index --find-links "$WHEELS" jsonargparse docstring-parser typeshed-client \
    typing-extensions matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six
fi
$PY -c "import jsonargparse, docstring_parser, typeshed_client, matplotlib" \
  || { echo "error: missing Python packages: see the wheels listed at the top of $0 (WHEELS=DIR)"; exit 1; }
if [[ -n "${SMOKE:-}" ]]; then
  DEV=cpu; ACC=cpu; T=10; ROUNDS=(--rounds 1 --steps 2 --warmup 1); ROUNDS512=("${ROUNDS[@]}")
  printf 'trainer:\n  limit_train_batches: 3\n  limit_val_batches: 2\n  limit_test_batches: 2\n  max_epochs: 2\n' \
    > "$LOG/smoke.yaml"
  SHORT=(--config "$LOG/smoke.yaml")
else
  DEV=cuda; ACC=gpu; T=1; ROUNDS=(--rounds 3 --steps 200 --warmup 20); ROUNDS512=(--rounds 3 --steps 40 --warmup 10)
  SHORT=()
fi
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run it (at most SECONDS x T), output to $LOG/NAME.log and the screen
  local name=$1 limit=$(($2 * T)); shift 2
  echo "=== $name: $*"
  local start rc
  start=$(date +%s.%N)
  set +e  # a failed or timed-out step is reported, and the others still run
  timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log" | grep -v -e "it/s" -e "Warning" -e "warnings.warn"
  rc=${PIPESTATUS[0]}
  set -e
  awk -v n="$name" -v rc="$rc" -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%s\t%s\t%.2f\n", n, rc, b - a}' \
    | tee -a "$LOG/times.tsv"
}

{ nvidia-smi -L || true; $PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } \
  | tee "$LOG/env.txt"
step decode 120 $PY -c "from lit_cifar.data import CIFARDataModule as D; D('$DATA').prepare_data()"
B=($PY scripts/benchmark.py --data-dir "$DATA" --device $DEV)
step bench_b64 120 "${B[@]}" --batch-size 64 "${ROUNDS[@]}" --out "$LOG/bench_b64.json"
step bench_b64_compile 240 "${B[@]}" --batch-size 64 --compile "${ROUNDS[@]}" --out "$LOG/bench_b64_compile.json"
B512=("${B[@]}" --batch-size 512 --precision bf16-mixed "${ROUNDS512[@]}")
step bench_b512 120 "${B512[@]}" --out "$LOG/bench_b512.json"
step bench_b512_compile 240 "${B512[@]}" --compile --out "$LOG/bench_b512_compile.json"
if $PY -c "import pytest" 2>/dev/null; then
  step sync_test 120 $PY -m pytest tests/test_speed.py -q -p no:cacheprovider -k never_wait
fi
TRAIN=($PY scripts/train.py --accelerator $ACC --data-dir "$DATA")
step seed_recipe 120 "${TRAIN[@]}" --config configs/seed.yaml "${SHORT[@]}"
step fast_recipe 120 $PY scripts/speed_e2e.py --out "$LOG/fast_recipe.json" until 0.665 -- \
  --config configs/seed_bn.yaml --data.data_dir "$DATA" --trainer.accelerator $ACC --data.batch_size 512 \
  --trainer.precision bf16-mixed --model.lr 0.01 --trainer.max_epochs 20 "${SHORT[@]}"
step default_recipe 240 "${TRAIN[@]}" "${SHORT[@]}"
step seed_bn_recipe 240 "${TRAIN[@]}" --config configs/seed_bn.yaml "${SHORT[@]}"

$PY - "$LOG" "${SMOKE:-}" <<'EOF' | tee "$LOG/summary.txt"
"""The one table: every number above, read back from the JSON files and times.tsv."""
import json, sys
from pathlib import Path

log, smoke = Path(sys.argv[1]), sys.argv[2]
read = lambda name: json.loads((log / f"{name}.json").read_text()) if (log / f"{name}.json").exists() else None
times = {n: (int(rc), float(s)) for n, rc, s in (line.split("\t") for line in (log / "times.tsv").read_text().splitlines())}
print(f"\n{'=' * 100}\nGPU speed{' (SMOKE: a few batches on the CPU, numbers meaningless)' if smoke else ''} | "
      f"{(log / 'env.txt').read_text().strip()}")
print(f"{'benchmark.py, img/s (median of rounds)':<44}{'a seed':>9}{'b plain':>9}{'c ours':>9}{'d bare':>9}"
      f"{'c/a':>7}{'c/b':>6}{'c/d':>6}")
for name, label in (("bench_b64", "batch 64 fp32"), ("bench_b64_compile", "batch 64 fp32, compile"),
                    ("bench_b512", "batch 512 bf16-mixed"), ("bench_b512_compile", "batch 512 bf16-mixed, compile")):
    r = read(name)
    if r is None:
        print(f"{label:<44}failed (exit {times.get(name, ('?',))[0]}): see {name}.log")
        continue
    m, q = r["median"], r["ratios"]
    print(f"{label:<44}{m['a']:>9.0f}{m['b']:>9.0f}{m['c']:>9.0f}{m['d']:>9.0f}{q['c/a']:>7.1f}{q['c/b']:>6.2f}"
          f"{q['c/d']:>6.2f}")
if "sync_test" in times:
    print(f"tests/test_speed.py on the GPU (no host-device sync in a training or validation step): exit {times['sync_test'][0]}")
print(f"\n{'end to end (data cache warm)':<72}{'exit':>5}{'wall s':>9}  target")
for name, label, target in (
    ("seed_recipe", "seed recipe: train.py --config configs/seed.yaml (fit + test)", "<= 30 s"),
    ("default_recipe", "default recipe: train.py (fit + test)", ""),
    ("seed_bn_recipe", "train.py --config configs/seed_bn.yaml (fit + test)", ""),
    ("fast_recipe", "fast recipe: seed_bn, batch 512, bf16-mixed, lr 1e-2, 20 epochs (fit)", ""),
):
    rc, seconds = times.get(name, (None, float("nan")))
    print(f"{label:<72}{rc if rc is not None else '-':>5}{seconds:>9.1f}  {target}")
fast = read("fast_recipe")
if fast and fast["epoch_val_acc"]:
    reached, accs = fast["reached"], fast["epoch_val_acc"]
    when = f"after {reached['train_s']:.2f} s of training, epoch {reached['epoch']}" if reached else "never"
    print(f"fast recipe: val/acc first >= 0.665 {when} (target <= 3 s); after epoch {len(accs)}: {accs[-1]:.4f}")
EOF
