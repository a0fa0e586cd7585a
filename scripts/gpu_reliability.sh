#!/usr/bin/env bash
# Issue 6's device check (docs/reliability.md): a run SIGKILLed mid-epoch and resumed with
# --ckpt_path last ends bit-identical to an uninterrupted one on the GPU (augmentation drawn per batch on the GPU),
# and --model.lr 1e6 stops at the first NaN, keeping the last good checkpoint. Tiny generated data,
# deterministic kernels (so two runs can be compared bit for bit); about 2 minutes on an H100.
#   bash scripts/gpu_reliability.sh          # gpu
#   bash scripts/gpu_reliability.sh cpu      # the same on the CPU
set -u
ACCEL=${1:-gpu}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$WORK:$REPO${PYTHONPATH:+:$PYTHONPATH} CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1
cd "$WORK" || exit 1
cat > killer.py <<'PY'
import os, signal
from lightning.pytorch.callbacks import Callback

class KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
PY
printf 'trainer:\n  callbacks:\n    - class_path: killer.KillAtStep\n      init_args: {step: 5}\n' > kill.yaml
python3 -c "import sys; sys.path.insert(0, '$REPO/tests'); from conftest import write_image_folder; from pathlib import Path; write_image_folder(Path('images'))"
A=(fit --data.data_dir=images --trainer.accelerator="$ACCEL" --trainer.devices=1 --data.batch_size=8 --data.val_size=12
   --trainer.max_epochs=2 --trainer.enable_progress_bar=false --trainer.log_every_n_steps=1
   --last_checkpoint.every_n_train_steps=2 --trainer.deterministic=true)
L=lightning_logs/version_0/checkpoints/last.ckpt
run() { echo "=== lit-cifar $*"; python3 -m lit_cifar.cli "$@" > log.txt 2>&1; echo "exit $?"; grep -E "^error|resuming" log.txt; }

run "${A[@]}" --trainer.default_root_dir=ref1
run "${A[@]}" --trainer.default_root_dir=ref2
run "${A[@]}" --config=kill.yaml  # 6 steps an epoch: killed after step 5, last.ckpt from step 4
python3 -c "import torch; c = torch.load('$L', weights_only=True); s = c['loops']['fit_loop']['state_dict']['combined_loader'][0]; print('after the kill: last.ckpt at step', c['global_step'], 'epoch', c['epoch'], '| loader place:', s)"
run "${A[@]}" --ckpt_path=last --trainer.callbacks=[]  # resumed with the run's config.yaml, less its killer
echo "run folders: $(ls lightning_logs)"
python3 - <<'PY'
import torch

L = "lightning_logs/version_0/checkpoints/last.ckpt"
w = {name: torch.load(prefix + L, weights_only=True)["state_dict"] for name, prefix in (("ref1", "ref1/"), ("ref2", "ref2/"), ("resumed", ""))}
for a, b in (("ref1", "ref2"), ("ref1", "resumed")):
    same = all(torch.equal(w[a][k], w[b][k]) for k in w[a])
    diff = max((w[a][k] - w[b][k]).abs().max().item() for k in w[a])
    print(f"{a} vs {b}: bit-identical {same}, max |diff| {diff:.3g}")
PY
rm -rf lightning_logs
run "${A[@]}" --model.lr=1e6 --last_checkpoint.every_n_train_steps=1
