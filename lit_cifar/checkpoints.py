"""Reading, checking and writing checkpoints: weights-only loads, one clear error per bad file, atomic saves.

python -c "from lit_cifar.checkpoints import load_model; print(load_model('path/to/last.ckpt'))"
"""

import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_cifar.errors import UserError, one_line
from lit_cifar.module import CIFARClassifier

INPUT_SETTINGS = ("dataset", "normalize")  # the DataModule settings that decide what the model sees
BY_TRAINING = "give a .ckpt file written by `lit-cifar fit` or scripts/train.py."


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's dict, read weights-only (tensors and plain values: a file crafted to
    run code when unpickled is refused before any of it runs); a UserError for anything else."""
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
    except Exception as err:  # noqa: BLE001 - zip, pickle and storage errors all mean "not a checkpoint"
        # torch names a refused global, e.g. "Unsupported global: GLOBAL posix.system was not ..."
        found = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if found is None:  # not a pickle torch reads at all: text, an image, another format
            raise UserError(
                f"{path} is not a PyTorch checkpoint, or it is truncated ({_reason(err)}): give a .ckpt "
                f"file written by training."
            ) from None
        raise UserError(
            f"refused to load {path}: besides tensors and plain values it holds a Python object "
            f"({found.group(1)}) that would run code when loaded. Checkpoints are read weights-only, so "
            f"nothing in it ran. Use a checkpoint written by lit-cifar training; if you made this file "
            f"yourself and trust it, load it in Python and save only its tensors and plain settings."
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(
            f"{path} is a PyTorch file but not a Lightning checkpoint (no 'state_dict'): {BY_TRAINING}"
        )
    bad = [k for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor) and not v.isfinite().all()]
    if bad:
        raise UserError(
            f"{path} holds NaN or infinite weights ({_first3(bad)}): the run that wrote it had diverged. "
            f"Use an earlier checkpoint of that run, or train again with a lower --model.lr."
        )
    return ckpt


def _reason(err: BaseException) -> str:
    """The gist of a torch.load error: the unpickler's own complaint, else the first sentence."""
    text = str(err).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:
        return found.group(1).strip().splitlines()[0][:150]
    first = text.splitlines()[0] if text else type(err).__name__
    return first.split(". ")[0].rstrip(".")[:150]


def _first3(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")


def _hparams(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The saved __init__ arguments, without LightningCLI's own entries (_instantiator, _class_path)."""
    return {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}


def check_hparams(ckpt: dict[str, Any], model_class: type, path: str | Path) -> None:
    """UserError unless the checkpoint's hyperparameters build `model_class` (right names, types, ranges)."""
    from jsonargparse import ArgumentParser  # the parser LightningCLI checks settings with

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(model_class)
    try:
        parser.parse_object(_hparams(ckpt))
        model_class(**_hparams(ckpt))
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
    saved = ckpt.get("hyper_parameters") or {}
    trained = saved.get("class_names")
    if classes is not None and trained is not None and list(trained) != list(classes):
        raise UserError(
            f"{path} was trained on the classes {_names(trained)}, but the data has {_names(classes)}: "
            f"evaluate or resume it on data with the classes it was trained on (the same class "
            f"folders), or train a new model on this data."
        )
    want, got = model.state_dict(), ckpt["state_dict"]
    problems = {
        "missing": [k for k in want if k not in got],
        "unexpected": [k for k in got if k not in want],
        "other shape": [k for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape)],
    }
    if not any(problems.values()):
        return
    hp = getattr(model, "hparams", {})
    details = "; ".join(f"{label}: {_first3(keys)}" for label, keys in problems.items() if keys)
    raise UserError(
        f"{path} holds another network ({saved.get('net', '?')}, {saved.get('num_classes', '?')} classes) "
        f"than the one set up ({hp.get('net', '?')}, {hp.get('num_classes', '?')} classes): {details}. "
        f"Use the checkpoint's settings (e.g. --model.net {saved.get('net', 'NAME')}) or another checkpoint."
    )


def _names(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > 12 else ""
    return "[" + ", ".join(map(str, names[:12])) + more + "]"


def read_checkpoint(path: str | Path) -> dict:
    """A lit-cifar checkpoint's dict, read weights-only (load_checkpoint); else a UserError."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("hyper_parameters"), dict) or "net" not in ckpt["hyper_parameters"]:
        raise UserError(
            f"{path} is not a lit-cifar checkpoint (no CIFARClassifier hyperparameters): {BY_TRAINING}"
        )
    check_hparams(ckpt, CIFARClassifier, path)
    return ckpt


def model_from(ckpt: dict, path: str | Path) -> CIFARClassifier:
    """The model of a checkpoint read_checkpoint returned (no file access), in eval mode on the CPU."""
    try:
        model = CIFARClassifier(**_hparams(ckpt))
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError) as err:  # weights of another shape, unknown settings
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path} does not fit the lit-cifar model: {first[:200]}") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[CIFARClassifier, dict]:
    """(the model, in eval mode on the CPU; the DataModule settings it was trained with): one file read."""
    ckpt = read_checkpoint(path)
    return model_from(ckpt, path), input_settings(ckpt)


def input_settings(ckpt: dict) -> dict:
    """The training DataModule's `dataset` and `normalize`: how to prepare images for this model
    (none saved, as for a model trained without the DataModule: the DataModule's defaults apply)."""
    saved = ckpt.get("datamodule_hyper_parameters") or {}
    return {k: saved[k] for k in INPUT_SETTINGS if k in saved}


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with weights-only reads (whatever the caller asks) and atomic writes:
    to `<name>.partial` beside the target, fsynced, then renamed over it, so a kill at any moment
    leaves the old or the new checkpoint, never a torn one. (Lightning's own write goes through the
    system temp folder, which becomes a copy in place when that is another file system.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        # remote storage: fsspec's transaction is the best there is (storage_options: Lightning refuses them)
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
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
        # make the rename itself survive a power cut (some systems cannot open or fsync a folder)
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
