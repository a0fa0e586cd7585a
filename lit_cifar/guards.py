"""What keeps a long run safe: checkpoints written atomically and read weights-only, a stop at divergence.

The `lit-cifar` command and scripts/train.py use all of it (see lit_cifar/cli.py); docs/reliability.md
lists the faults each part was tried against and what the user sees.

    python -c "from lit_cifar.guards import load_checkpoint; print(load_checkpoint('last.ckpt').keys())"
"""

import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_cifar.errors import UserError, one_line
from lit_cifar.module import SCHEDULES

# ---------------------------------------------------------------------------- reading and writing checkpoints


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's dict, read with `weights_only=True`; a UserError for anything else.

    Weights-only unpickling builds tensors and plain values only, so a file crafted to run code
    when unpickled is refused before any of it runs.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{path} is a folder, not a checkpoint: give a .ckpt file in it (e.g. {path / 'last.ckpt'})."
        )
    if path.is_symlink() and not path.exists():
        raise UserError(
            f"{path} is a broken or looping symbolic link: point it at a .ckpt file, or give the file."
        )
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
    bad = [k for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor) and _not_finite(v)]
    if bad:
        raise UserError(
            f"{path} holds NaN or infinite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): "
            f"the run that wrote it had diverged. Use an earlier checkpoint of that run, or train again "
            f"with a lower --model.lr."
        )
    return ckpt


def _not_finite(t: torch.Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())


def check_hparams(ckpt: dict[str, Any], model_class: type, path: str | Path) -> None:
    """UserError unless the checkpoint's hyperparameters build `model_class` (right names, types, ranges)."""
    from jsonargparse import ArgumentParser  # the parser LightningCLI checks settings with

    hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(model_class)
    try:
        parser.parse_object(hparams)
        model_class(**hparams)
    except Exception as err:  # noqa: BLE001 - the parser's ArgumentError, the model's own checks
        raise UserError(
            f"{path} holds hyperparameters {model_class.__name__} does not accept ({one_line(err)[:300]}): "
            f"give a checkpoint written by lit-cifar training."
        ) from None


def check_fits(
    ckpt: dict[str, Any], model: torch.nn.Module, path: str | Path, classes: list[str] | None = None
) -> None:
    """UserError unless the checkpoint's weights have exactly the model's names and shapes, and its
    class names are `classes` (the data's), when both are known."""
    trained = (ckpt.get("hyper_parameters") or {}).get("class_names")
    if classes is not None and trained is not None and list(trained) != list(classes):
        raise UserError(
            f"{path} was trained on the classes {_names(trained)}, but the data has {_names(classes)}: "
            f"evaluate or resume it on data with the classes it was trained on (the same class "
            f"folders), or train a new model on this data."
        )
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


def _names(names: list[str]) -> str:
    return (
        "[" + ", ".join(map(str, names[:12])) + (f", ... ({len(names)} in all)]" if len(names) > 12 else "]")
    )


def check_writable(folder: str | Path, setting: str) -> None:
    """UserError unless `folder` is, or can be made, a folder this process may write in."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if existing.is_symlink() and not existing.exists():
        raise UserError(f"{existing} is a broken symbolic link: fix it, or choose another {setting}.")
    if not existing.is_dir():
        raise UserError(f"{existing} is a file, not a folder: choose another {setting}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"{existing} is read-only for this user: choose a folder you may write with {setting}."
        )


def check_output(path: str | Path, written_by_us: Callable[[Path], bool], setting: str) -> None:
    """UserError unless `path` can be written: not a folder, its folder writable, and an existing file
    only when this command wrote it (a re-run replaces its own output, never a user's other file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{path} is a folder, not a file: give {setting} a file path (e.g. a new file in {path})."
        )
    if path.exists() and not written_by_us(path):
        raise UserError(
            f"{path} exists and was not written by this command: it is never overwritten. Give "
            f"{setting} another name, or remove the file yourself."
        )
    check_writable(path.parent, setting)


def check_accelerator(accelerator: str | None, setting: str) -> None:
    """UserError when a GPU is asked for and there is none (Lightning's own message names no fix)."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        if accelerator == "cuda" or not torch.backends.mps.is_available():
            raise UserError(
                f"accelerator {accelerator!r} asked for, but this machine has no usable GPU (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda}): use {setting} cpu (or auto: a "
                f"GPU when there is one)."
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
        hp = getattr(pl_module, "hparams", {})
        tips = [f"lower the learning rate (--model.lr, now {hp['lr']:g})"] if "lr" in hp else []
        if hp.get("schedule") == "constant":  # a schedule with a warm-up: every one but constant
            tips += [f"warm it up (--model.schedule {' or '.join(s for s in SCHEDULES if s != 'constant')})"]
        elif "warmup_fraction" in hp:
            tips += [f"warm up longer (--model.warmup_fraction, now {hp['warmup_fraction']:g})"]
        advice = " or ".join(tips)
        return f"The run stopped there without saving; {where}. {advice[:1].upper()}{advice[1:]}, then start again."
