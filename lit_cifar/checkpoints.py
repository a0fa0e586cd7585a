"""TODO docstring: lit_cifar/checkpoints.py."""

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_cifar.errors import UserError, one_line
from lit_cifar.module import CIFARClassifier


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


INPUT_SETTINGS = ("dataset", "normalize")  # the DataModule settings that decide what the model sees


def read_checkpoint(path: str | Path) -> dict:
    """A lit-cifar checkpoint's dict, read weights-only (load_checkpoint); else a UserError."""
    ckpt = load_checkpoint(path)
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or "net" not in hparams:
        raise UserError(
            f"{path} is not a lit-cifar checkpoint (no CIFARClassifier hyperparameters): "
            f"give a .ckpt file written by `lit-cifar fit` or scripts/train.py."
        )
    check_hparams(ckpt, CIFARClassifier, path)
    return ckpt


def load_model(path: str | Path) -> tuple[CIFARClassifier, dict]:
    """(the model, in eval mode on the CPU; the DataModule settings its inputs were prepared with)."""
    ckpt = read_checkpoint(path)
    try:
        model = CIFARClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except (RuntimeError, KeyError, TypeError) as err:  # weights of another shape, unknown settings
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path} does not fit the lit-cifar model: {first[:200]}") from None
    return model.eval(), input_settings(ckpt)


def input_settings(ckpt: dict) -> dict:
    """The training DataModule's `dataset` and `normalize`: how to prepare images for this model.

    Missing (a model trained without the DataModule): the DataModule's defaults apply.
    """
    saved = ckpt.get("datamodule_hyper_parameters") or {}
    return {k: saved[k] for k in INPUT_SETTINGS if k in saved}


def model_from(ckpt: dict, path: str | Path) -> CIFARClassifier:
    """The model of a checkpoint already read, in eval mode on the CPU; a UserError when it does not fit."""
    hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    try:
        model = CIFARClassifier(**hparams)
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError) as err:  # weights of another shape, unknown settings
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path} does not fit the lit-cifar model: {first[:200]}") from None
    return model.eval()
