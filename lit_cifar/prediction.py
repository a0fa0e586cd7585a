"""TODO docstring: lit_cifar/prediction.py."""

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

TOP_K = 3


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

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict":  # before any image is read, not when the CSV is due
            check_output(self.output, _is_predictions_csv, "the output")

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


def _is_predictions_csv(path: Path) -> bool:
    """Whether `path` is a CSV written by PredictionWriter (its header line), which a re-run replaces."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n") == ",".join(CSV_COLUMNS)
    except (OSError, UnicodeDecodeError):
        return False


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
