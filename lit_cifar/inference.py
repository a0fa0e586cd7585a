"""Using a trained model: people's images in, class probabilities out, a CSV; the export wrapper.

Images of any size and mode are made the way CIFAR was: decoded as training decodes them
(lit_cifar.sources.pixels: RGB, alpha dropped, 16 bits scaled to 8), resized to 32x32 with antialiasing.

    python scripts/predict.py last.ckpt photos/          # -> predictions.csv
    python scripts/export.py last.ckpt --format onnx     # -> last.onnx
"""

import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lit_cifar.errors import UserError
from lit_cifar.guards import load_checkpoint
from lit_cifar.module import CIFARClassifier
from lit_cifar.sources import IMAGE_SUFFIXES, NOT_REGULAR, BadFile, file_kind, open_image, pixels, refuse

INPUT_SETTINGS = ("dataset", "normalize")  # the DataModule settings that decide what the model sees
TOP_K = 3
SKIPPED_EXIT = 3  # exit status of a prediction run that had to skip unreadable files
# The best class and its probability, then the 2nd and 3rd best.
CSV_COLUMNS = ["path", "class", "probability", "class_2", "probability_2", "class_3", "probability_3"]

# ---------------------------------------------------------------------------- checkpoints


def read_checkpoint(path: str | Path) -> dict:
    """A lit-cifar checkpoint's dict, read weights-only (guards.load_checkpoint); else a UserError."""
    ckpt = load_checkpoint(path)
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or "net" not in hparams:
        raise UserError(
            f"{path} is not a lit-cifar checkpoint (no CIFARClassifier hyperparameters): "
            f"give a .ckpt file written by `lit-cifar fit` or scripts/train.py."
        )
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


# ---------------------------------------------------------------------------- images


def find_images(inputs: str | Sequence[str]) -> list[Path]:
    """Files named directly (whatever their suffix) and PNG/JPEG files found under folders, in order.

    Only regular files: a named pipe, socket, device or broken link is refused before anything is read."""
    paths: list[Path] = []
    for item in [inputs] if isinstance(inputs, str) else inputs:
        path = Path(item)
        if not os.path.lexists(path):
            raise UserError(f"{path} does not exist: give image files or folders of images.")
        if path.is_dir():
            paths += sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and not p.is_dir()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            paths.append(path)
    refuse(
        ", ".join(map(str, [inputs] if isinstance(inputs, str) else inputs)),
        [(p, BadFile(NOT_REGULAR, kind)) for p in paths if (kind := file_kind(p)[0]) != "a file"],
    )
    if not paths:
        raise UserError(f"no PNG/JPEG images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}.")
    return paths


def read_image(path: str | Path) -> torch.Tensor:
    """Any image PIL reads -> uint8 (3, 32, 32): upright (EXIF), RGB, resized with antialiasing.

    A 32x32 file gives exactly the pixels training reads from it (`sources.pixels`); files over
    Image.MAX_IMAGE_PIXELS are refused before decoding. Raises sources.BadFile."""
    with open_image(path) as img:
        if img.size != (32, 32):
            img.draft("RGB", (64, 64))  # JPEG: decode big photos at a reduced scale (>= 64 px), much faster
        x = pixels(img)  # (3, H, W)
    if x.shape[1:] != (32, 32):
        # Squashed to 32x32 like CIFAR's source images; bicubic antialiases when shrinking.
        small = Image.fromarray(x.permute(1, 2, 0).numpy()).resize((32, 32), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(small)).permute(2, 0, 1)  # (32, 32, 3) -> (3, 32, 32)
    return x


class ImageFiles(Dataset):
    """(image uint8 (3, 32, 32), path, error): an unreadable file gives zeros and its error, never raises."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        try:
            return read_image(self.paths[i]), self.paths[i], ""
        except Exception as err:  # noqa: BLE001 - decoders raise many types; all mean a bad file
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return torch.zeros(3, 32, 32, dtype=torch.uint8), self.paths[i], reason or "unreadable"


def image_loader(inputs: str | Sequence[str], batch_size: int, num_workers: int) -> DataLoader:
    """Batches (x uint8 (B, 3, 32, 32), paths [B], errors [B]) of the images in `inputs`, in order."""
    return DataLoader(
        ImageFiles(find_images(inputs)),
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=False,
    )


# ---------------------------------------------------------------------------- predictions -> CSV


class PredictionWriter(BasePredictionWriter):
    """Writes one CSV row per readable image (path, then the top-3 classes and probabilities), prints a table.

    Unreadable files are reported on stderr and left out; `skipped` lists them (path, reason),
    so entry points can exit non-zero. The CSV is written whole at the end (temp file + rename).
    """

    def __init__(self, output: str = "predictions.csv", show: int = 20) -> None:
        """
        Args:
            output: the CSV file to write.
            show: how many rows the printed table shows (the CSV has them all).
        """
        super().__init__(write_interval="batch")
        self.output, self.show = output, show
        self.rows: list[dict] = []
        self.skipped: list[tuple[str, str]] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self.rows, self.skipped = [], []

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        # prediction: (B, C) probabilities; batch: (x, paths, errors) from ImageFiles
        _, paths, errors = batch
        names = pl_module.class_names
        k = min(TOP_K, prediction.shape[1])
        probs, labels = prediction.float().topk(k, dim=1)  # (B, k) each, best first
        for path, error, p, c in zip(paths, errors, probs.tolist(), labels.tolist(), strict=True):
            if error:
                self.skipped.append((path, error))
                continue
            row = {"path": path}
            for rank, (ci, pi) in enumerate(zip(c, p, strict=True), start=1):
                suffix = "" if rank == 1 else f"_{rank}"
                row[f"class{suffix}"], row[f"probability{suffix}"] = names[ci], f"{pi:.6f}"
            self.rows.append(row)

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:  # each rank predicted its own shard: rank 0 writes them all
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (self.rows, self.skipped))
            rows = {r["path"]: r for part in gathered for r in part[0]}  # the sampler may repeat some
            self.rows = sorted(rows.values(), key=lambda r: r["path"])
            self.skipped = sorted({s for part in gathered for s in part[1]})
        if trainer.is_global_zero:
            _write_csv_atomic(Path(self.output), self.rows)
            self._print()

    def _print(self) -> None:
        width = min(60, max([len("path"), *(len(r["path"]) for r in self.rows[: self.show])]))
        print(f"{'path':<{width}}  {'class':<12} {'prob':>6}  2nd and 3rd")
        for r in self.rows[: self.show]:
            path = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3) :]
            others = "  ".join(
                f"{r[f'class_{i}']} {float(r[f'probability_{i}']):.3f}" for i in (2, 3) if f"class_{i}" in r
            )
            print(f"{path:<{width}}  {r['class']:<12} {float(r['probability']):>6.3f}  {others}")
        if len(self.rows) > self.show:
            print(f"... {len(self.rows) - self.show} more")
        print(f"{len(self.rows)} image(s) predicted -> {self.output}")
        if self.skipped:
            lines = "".join(f"\n  {path}: {reason}" for path, reason in self.skipped)
            print(f"skipped {len(self.skipped)} unreadable file(s):{lines}", file=sys.stderr)


def _write_csv_atomic(path: Path, rows: list[dict]) -> None:
    # A temporary file renamed into place: a killed run never leaves half a CSV.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="")  # fewer than 3 classes: blanks
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- export


class Deployable(nn.Module):
    """The network with its input preparation: uint8 RGB images (N, 3, 32, 32) -> probabilities (N, C).

    Exactly what the checkpoint computes in `predict`: pixels / 255, the training normalization
    (when it was on), the net (averaged with the mirror image's logits when `flip_tta`), softmax.
    """

    class_names: list[str]

    def __init__(
        self,
        net: nn.Module,
        class_names: list[str],
        mean_std: tuple[Sequence[float], Sequence[float]] | None,
        flip_tta: bool = False,
    ) -> None:
        super().__init__()
        self.net, self.flip_tta = net, flip_tta
        self.class_names = list(class_names)
        mean, std = mean_std if mean_std is not None else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255 - self.mean) / self.std  # (N, 3, 32, 32) as in training
        logits = self.net(x)  # (N, C)
        if self.flip_tta:
            logits = (logits + self.net(x.flip(3))) / 2
        return logits.softmax(dim=-1)
