"""Predicting people's images: ImageFiles and its loader, PredictionWriter (the CSV and the table).
Run by either of:

    python scripts/predict.py last.ckpt photos/
    lit-cifar predict --ckpt_path last.ckpt --data.predict_dir photos/
"""

import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from lit_cifar.errors import check_output
from lit_cifar.images import find_images, read_image

SKIPPED_EXIT = 3  # exit status of a prediction run that had to skip unreadable files
# The best class and its probability, then the 2nd and 3rd best.
CSV_COLUMNS = ["path", "class", "probability", "class_2", "probability_2", "class_3", "probability_3"]


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
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            return torch.zeros(3, 32, 32, dtype=torch.uint8), self.paths[i], reason


def image_loader(inputs: str | Sequence[str], batch_size: int, num_workers: int) -> DataLoader:
    """Batches (x uint8 (B, 3, 32, 32), paths [B], errors [B]) of the images in `inputs`, in order."""
    return DataLoader(ImageFiles(find_images(inputs)), batch_size=batch_size, num_workers=num_workers)


class PredictionWriter(BasePredictionWriter):
    """One CSV row per readable image (its path, the top 3 classes and probabilities), then a table.
    Unreadable files go to stderr and `skipped` (path, reason): entry points exit SKIPPED_EXIT."""

    def __init__(self, output: str = "predictions.csv", show: int = 20) -> None:
        """
        Args:
            output: the CSV file to write.
            show: how many rows the printed table shows (the CSV has them all).
        """
        super().__init__(write_interval="batch")
        self.output, self.show = output, show
        self.rows: list[list[str]] = []  # as CSV_COLUMNS; shorter with fewer than 3 classes
        self.skipped: list[tuple[str, str]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict":  # before any image is read, not when the CSV is due
            check_output(self.output, _is_predictions_csv, "the output")
            self.rows, self.skipped = [], []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, *_) -> None:
        _, paths, errors = batch  # prediction: (B, C) probabilities
        probs, labels = prediction.float().topk(min(3, prediction.shape[1]), dim=1)  # (B, k), best first
        for path, error, p, c in zip(paths, errors, probs.tolist(), labels.tolist(), strict=True):
            top = [v for i, q in zip(c, p, strict=True) for v in (pl_module.class_names[i], f"{q:.6f}")]
            if error:
                self.skipped.append((path, error))
            else:
                self.rows.append([path, *top])

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:  # each rank predicted its own shard: rank 0 writes them all
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (self.rows, self.skipped))
            self.rows = sorted({r[0]: r for part in gathered for r in part[0]}.values())  # some repeated
            self.skipped = sorted({s for part in gathered for s in part[1]})
        if trainer.is_global_zero:
            _write_csv(Path(self.output), self.rows)
            self._print()

    def _print(self) -> None:
        shown = self.rows[: self.show]
        width = min(60, max([len("path"), *(len(r[0]) for r in shown)]))
        print(f"{'path':<{width}}  {'class':<12} {'prob':>6}  2nd and 3rd")
        for path, top, p, *rest in shown:
            path = path if len(path) <= width else "..." + path[3 - width :]
            others = "  ".join(f"{c} {float(q):.3f}" for c, q in zip(rest[::2], rest[1::2], strict=True))
            print(f"{path:<{width}}  {top:<12} {float(p):>6.3f}  {others}")
        more = f"... {len(self.rows) - self.show} more\n" if len(self.rows) > self.show else ""
        print(f"{more}{len(self.rows)} image(s) predicted -> {self.output}")
        if self.skipped:
            lines = "".join(f"\n  {path}: {reason}" for path, reason in self.skipped)
            print(f"skipped {len(self.skipped)} unreadable file(s):{lines}", file=sys.stderr)


def _is_predictions_csv(path: Path) -> bool:
    """Whether `path` is a CSV written by PredictionWriter (its header line), which a re-run replaces."""
    try:
        with open(path, "rb") as f:
            return f.readline().rstrip(b"\r\n") == ",".join(CSV_COLUMNS).encode()
    except OSError:
        return False


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    # A temporary file renamed into place: a killed run never leaves half a CSV.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:  # fewer than 3 classes: blank columns
            csv.writer(f).writerows([CSV_COLUMNS, *(r + [""] * (len(CSV_COLUMNS) - len(r)) for r in rows)])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
