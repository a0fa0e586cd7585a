"""DivergenceGuard, the callback that stops a diverged run (on in the CLI: --divergence_guard.*).

lit-cifar fit --model.lr 1e6 ...   ->  error: training diverged: the training loss was nan at step 3. ...
"""

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_cifar.errors import UserError
from lit_cifar.module import SCHEDULES

NO_STEP = 2**62  # "no bad step seen yet"; the min over ranks of it stays NO_STEP


class Diverged(UserError):
    """The training loss or the weights became NaN or infinite."""


class DivergenceGuard(Callback):
    """Stops training at the first NaN/inf loss, before a diverged model can overwrite a checkpoint.

    Each step adds two tiny device ops (is the loss finite? remember the first bad step); the host reads
    that flag only every `check_every_n_steps`, at each epoch end and in every checkpoint save (which also
    checks the weights), so the hot loop never waits on the device. Stopping raises `Diverged`: entry
    points print its message and exit non-zero; the last checkpoint written stays as it was.
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        """
        Args:
            check_every_n_steps: how often the host looks at the flag; None: the Trainer's log_every_n_steps.
        """
        super().__init__()
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise UserError(f"check_every_n_steps must be at least 1, got {check_every_n_steps}.")
        self.check_every_n_steps = check_every_n_steps
        self._bad_step: torch.Tensor | None = None  # int64 scalar on the device: first bad step or NO_STEP
        self._bad_loss: torch.Tensor | None = None  # the loss at that step (nan or inf)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bad_step = torch.full((), NO_STEP, dtype=torch.int64, device=pl_module.device)
        self._bad_loss = torch.zeros((), device=pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # a skipped step has no loss
            return
        first = ~torch.isfinite(loss.detach()) & (self._bad_step == NO_STEP)
        self._bad_step = torch.where(first, trainer.global_step, self._bad_step)
        self._bad_loss = torch.where(first, loss.detach().float(), self._bad_loss)
        if trainer.global_step % (self.check_every_n_steps or trainer.log_every_n_steps) == 0:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Runs inside every save, on every rank, before anything is written: raising here keeps the
        # previous file. The loss flag may lag the weights by one step, so look at the weights too.
        self._check(trainer)
        if not torch.stack([p.isfinite().all() for p in pl_module.parameters()]).all():  # one sync per save
            raise _diverged(trainer, f"the weights became NaN or infinite at step {trainer.global_step}")

    def _check(self, trainer: L.Trainer) -> None:
        if self._bad_step is None or trainer.sanity_checking:
            return
        # the earliest bad step over all ranks, so every rank stops at the same check
        step = int(trainer.strategy.reduce(self._bad_step.clone(), reduce_op="min"))
        if step != NO_STEP:
            value = f"{self._bad_loss.item()}" if int(self._bad_step) == step else "NaN or infinite"
            raise _diverged(trainer, f"the training loss was {value} at step {step}")


def _diverged(trainer: L.Trainer, what: str) -> Diverged:
    """The error: what went wrong, where the last good checkpoint is, which of the run's settings to change."""
    kept = {getattr(cb, "last_model_path", "") for cb in trainer.checkpoint_callbacks}
    kept = sorted(p for p in kept if p and Path(p).is_file())
    where = "no checkpoint had been written yet"
    if kept:
        step = torch.load(kept[0], map_location="cpu", weights_only=True).get("global_step", "?")
        where = f"the last good checkpoint is kept: {kept[0]} (step {step})"
    hp = getattr(trainer.lightning_module, "hparams", {})
    tips = [f"lower the learning rate (--model.lr, now {hp['lr']:g})"] if "lr" in hp else []
    if hp.get("schedule") == "constant":  # a schedule with a warm-up: every one but constant
        tips += [f"warm it up (--model.schedule {' or '.join(s for s in SCHEDULES if s != 'constant')})"]
    elif "warmup_fraction" in hp:
        tips += [f"warm up longer (--model.warmup_fraction, now {hp['warmup_fraction']:g})"]
    advice = " or ".join(tips)
    return Diverged(
        f"training diverged: {what}. The run stopped there without saving; {where}. "
        f"{advice[:1].upper()}{advice[1:]}, then start again."
    )
