"""What keeps a long run safe: checkpoints written atomically and read weights-only, a stop at divergence.

The `lit-cifar` command and scripts/train.py use all of it (see lit_cifar/cli.py); docs/reliability.md
lists the faults each part was tried against and what the user sees.

    python -c "from lit_cifar.guards import load_checkpoint; print(load_checkpoint('last.ckpt').keys())"
"""

import os
import pickle
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_cifar.errors import UserError

# ---------------------------------------------------------------------------- reading and writing checkpoints


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's dict, read with `weights_only=True`; a UserError for anything else.

    Weights-only unpickling builds tensors and plain values only, so a file crafted to run code
    when unpickled is refused before any of it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: give the path of a .ckpt file written by training.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names a refused global, e.g. "Unsupported global: GLOBAL posix.system was not ..."
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle torch reads at all: text, an image, another format
            raise UserError(
                f"{path} is not a PyTorch checkpoint, or it is truncated ({_reason(err)}): give a "
                f".ckpt file written by training."
            ) from None
        raise UserError(
            f"refused to load {path}: besides tensors and plain values it holds a Python object "
            f"({found.group(1)}) that would run code when loaded. Checkpoints are read weights-only, so nothing in it ran. Use a checkpoint "
            f"written by lit-cifar training; if you made this file yourself and trust it, load it in "
            f"Python and save only its tensors and plain settings."
        ) from None
    except Exception as err:  # noqa: BLE001 - zip, legacy-pickle and storage errors all mean "not a checkpoint"
        raise UserError(
            f"{path} is not a PyTorch checkpoint, or it is truncated ({_reason(err)}): give a .ckpt "
            f"file written by training."
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(
            f"{path} is a PyTorch file but not a Lightning checkpoint (no 'state_dict'): give a .ckpt "
            f"file written by `lit-cifar fit` or scripts/train.py."
        )
    return ckpt


def check_fits(ckpt: dict[str, Any], model: torch.nn.Module, path: str | Path) -> None:
    """UserError unless the checkpoint's weights have exactly the model's names and shapes."""
    want = model.state_dict()
    got = ckpt["state_dict"]
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [k for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
    if not (missing or extra or shapes):
        return
    saved = ckpt.get("hyper_parameters") or {}
    hp = getattr(model, "hparams", {})
    details = "; ".join(
        f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for label, keys in (("missing", missing), ("unexpected", extra), ("other shape", shapes))
        if keys
    )
    raise UserError(
        f"{path} holds another network ({saved.get('net', '?')}, {saved.get('num_classes', '?')} classes) "
        f"than the one set up ({hp.get('net', '?')}, {hp.get('num_classes', '?')} classes): {details}. "
        f"Use the checkpoint's settings (e.g. --model.net {saved.get('net', 'NAME')}) or another checkpoint."
    )


def _reason(err: BaseException) -> str:
    """The gist of a torch.load error: the unpickler's own complaint, else the first sentence."""
    text = str(err).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:
        return found.group(1).strip().splitlines()[0][:150]
    first = text.splitlines()[0] if text else type(err).__name__
    return first.split(". ")[0].rstrip(".")[:150]


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save/torch.load checkpoint IO, made safe against kills and crafted files.

    Writes go to `<name>.partial` in the same folder, are flushed to disk, then renamed over the
    target (an atomic replace on POSIX file systems): a kill at any moment leaves either the old or
    the new checkpoint, never a torn one. (Lightning's own write commits through a temp file in the
    system temp folder, which becomes a copy in place when that is another file system.)
    Reads are always weights-only, whatever the caller asked for.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the best there is
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)  # only still there when the write failed
        _fsync_dir(path.parent)  # make the rename itself survive a power cut

    def load_checkpoint(
        self, path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some systems cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Lightning ends a run that receives SIGTERM (a preempted node, `kill`) with SIGTERMException, a
# SystemExit with status 0; entry points report it as the unfinished run it is.
SIGTERM_MESSAGE = (
    "stopped by SIGTERM before the run finished. Continue it with the same command plus --ckpt_path last: "
    "the steps since its last checkpoint (at most --last_checkpoint.every_n_train_steps) are trained again."
)

# ---------------------------------------------------------------------------- divergence


class Diverged(UserError):
    """The training loss or the weights became NaN or infinite."""


NO_STEP = 2**62  # "no bad step seen yet"; the min over ranks of it stays NO_STEP


class DivergenceGuard(Callback):
    """Stops training at the first NaN/inf loss, before a diverged model can overwrite a checkpoint.

    Each step adds two tiny device ops (is the loss finite? remember the first bad step); the host
    reads that flag only every `check_every_n_steps`, at each epoch end and before every checkpoint
    write, so the hot loop never waits on the device. A save also checks the weights themselves.
    Stopping raises `Diverged`: entry points print its message and exit non-zero; the last
    checkpoint written before the divergence stays as it was.
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        """
        Args:
            check_every_n_steps: how often the host looks at the flag; None: the Trainer's
                log_every_n_steps (when Lightning reads the logged values anyway).
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
        if loss is None or self._bad_step is None:  # a skipped step has no loss
            return
        loss = loss.detach()
        first = ~torch.isfinite(loss) & (self._bad_step == NO_STEP)
        self._bad_step = torch.where(first, trainer.global_step, self._bad_step)
        self._bad_loss = torch.where(first, loss.float(), self._bad_loss)
        every = self.check_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every == 0:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Runs inside every save, on every rank, before anything is written: raising here keeps the
        # previous file. The loss flag may lag the weights by one step, so look at the weights too.
        self._check(trainer)
        params = [p for p in pl_module.parameters()]
        if params and not torch.stack([torch.isfinite(p).all() for p in params]).all():
            raise Diverged(
                f"training diverged: the weights became NaN or infinite at step {trainer.global_step}. "
                + self._advice(trainer, pl_module)
            )

    def _check(self, trainer: L.Trainer) -> None:
        if self._bad_step is None or trainer.sanity_checking:
            return
        # the earliest bad step over all ranks, so every rank stops at the same check
        step = int(trainer.strategy.reduce(self._bad_step.clone(), reduce_op="min"))
        if step == NO_STEP:
            return
        value = f"{self._bad_loss.item()}" if int(self._bad_step) == step else "NaN or infinite"
        raise Diverged(
            f"training diverged: the training loss was {value} at step {step}. "
            + self._advice(trainer, trainer.lightning_module)
        )

    @staticmethod
    def _advice(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        kept = sorted(
            {cb.last_model_path for cb in trainer.checkpoint_callbacks if getattr(cb, "last_model_path", "")}
        )
        kept = [p for p in kept if Path(p).is_file()]
        where = "no checkpoint had been written yet"
        if kept:
            step = torch.load(kept[0], map_location="cpu", weights_only=True).get("global_step", "?")
            where = f"the last good checkpoint is kept: {kept[0]} (step {step})"
        lr = pl_module.hparams.get("lr", "?") if hasattr(pl_module, "hparams") else "?"
        return (
            f"The run stopped there without saving; {where}. Lower the learning rate (--model.lr, now {lr}) "
            f"or warm it up (--model.schedule cosine), then start again."
        )
