"""TODO docstring: lit_cifar/dashboard.py."""

import io

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import nn
from torch.utils.tensorboard.summary import hparams as hparams_summary

from lit_cifar.errors import UserError
from lit_cifar.figures import channel_grid, confusion_figure, image_figure, layer_outputs

# The HParams tab's metric columns: the values are the last points of the scalar series of these tags.
HPARAMS_METRICS = ("val/acc_best", "test/acc")


class TensorBoardDashboard(Callback):
    def __init__(
        self,
        inputs: bool = True,
        feature_maps: bool = True,
        confusion_matrix: bool = True,
        misclassified: bool = True,
        hparams: bool = True,
        num_images: int = 10,
        max_channels: int = 16,
        feature_map_images: int = 4,
        num_misclassified: int = 16,
    ) -> None:
        """
        Args:
            inputs: the fixed validation images with true and predicted labels, every validation epoch.
            feature_maps: per-channel grids of each conv and pooling output for those images.
            confusion_matrix: the confusion matrix over the validation (and test) set, per epoch.
            misclassified: at test time, a grid of misclassified test images.
            hparams: the HParams tab: this run's hyperparameters with metrics val/acc_best, test/acc.
            num_images: how many validation images make the fixed batch (the first ones).
            max_channels: feature-map channels shown per layer (the first ones).
            feature_map_images: rows of the feature-map grids: the first images of the fixed ones.
            num_misclassified: misclassified test images shown.
        """
        super().__init__()
        if min(num_images, max_channels, feature_map_images, num_misclassified) < 1:
            raise UserError(
                "num_images, max_channels, feature_map_images and num_misclassified must be at least 1."
            )
        self.inputs, self.feature_maps, self.confusion_matrix = inputs, feature_maps, confusion_matrix
        self.misclassified, self.hparams = misclassified, hparams
        self.num_images, self.max_channels = num_images, max_channels
        self.feature_map_images, self.num_misclassified = feature_map_images, num_misclassified
        self._hparams_written: set[str] = set()
        self.matrices: dict[str, torch.Tensor] = {}  # the last confusion matrix per stage: (C, C) counts
        self._reset()

    def _reset(self) -> None:
        self._matrix: torch.Tensor | None = None  # (C * C,) counts, true * C + predicted, on the device
        self._wrong: tuple[torch.Tensor, ...] | None = None  # (x, y, pred, key), at most K rows
        self._picked: list[tuple[torch.Tensor, ...]] = []  # (x, y, pred): the first validation images

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict":  # nothing to show
            return
        logger = _tensorboard(trainer)
        if logger is None:
            wanted = any(
                (self.inputs, self.feature_maps, self.confusion_matrix, self.misclassified, self.hparams)
            )
            if wanted and not trainer.fast_dev_run:  # fast_dev_run turns the logger off on purpose
                rank_zero_warn("TensorBoardDashboard writes nothing: the trainer has no TensorBoardLogger.")
            return
        if not self.hparams or not trainer.is_global_zero:
            return
        if logger.log_dir not in self._hparams_written:  # once per run folder (fit, then test)
            _write_hparams(logger, _run_hparams(trainer, pl_module))
            self._hparams_written.add(logger.log_dir)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if trainer.sanity_checking or _tensorboard(trainer) is None or (logits := _logits(outputs)) is None:
            return
        x, y, preds = batch[0], batch[1], logits.argmax(1)
        self._count(y, preds, logits.shape[1])
        picked = sum(len(p[1]) for p in self._picked)
        if dataloader_idx == 0 and picked < self.num_images and (self.inputs or self.feature_maps):
            k = self.num_images - picked
            self._picked.append((x[:k].detach().clone(), y[:k], preds[:k]))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if _tensorboard(trainer) is None or (logits := _logits(outputs)) is None:
            return
        preds = logits.argmax(1)
        self._count(batch[1], preds, logits.shape[1])
        if self.misclassified:
            self._keep_wrong(batch[0], batch[1], preds, batch_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = _tensorboard(trainer)
        if logger is not None and not trainer.sanity_checking:
            if self.confusion_matrix:
                self._log_confusion_matrix(trainer, pl_module, logger, "val")
            if trainer.is_global_zero and self._picked and (self.inputs or self.feature_maps):
                self._log_fixed_batch(trainer, pl_module, logger)
        self._reset()

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = _tensorboard(trainer)
        if logger is not None:
            if self.confusion_matrix:
                self._log_confusion_matrix(trainer, pl_module, logger, "test")
            if self.misclassified and trainer.is_global_zero and self._wrong is not None:
                x, y, pred, key = (t.cpu() for t in self._wrong)  # the one host sync of the test epoch
                wrong = key >= 1
                if wrong.any():
                    images = _for_display(x[wrong], trainer)
                    figure = image_figure(
                        images, y[wrong], pred[wrong], pl_module.class_names, "misclassified"
                    )
                    _add_png(logger, "test/misclassified", figure, trainer.global_step)
        self._reset()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._reset()

    # ------------------------------------------------------------------ collecting, without host syncs

    def _count(self, y: torch.Tensor, preds: torch.Tensor, c: int) -> None:
        # An index-add on the device (torch.bincount on a GPU reads its input's max on the host).
        if not self.confusion_matrix:
            return
        if self._matrix is None:
            self._matrix = torch.zeros(c * c, dtype=torch.long, device=y.device)
        self._matrix.index_add_(0, y * c + preds, torch.ones_like(y))

    def _keep_wrong(self, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, batch_idx: int) -> None:
        # A running pick of K images in fixed shapes (no host sync per batch): the top K keys, where
        # wrong images score 1 + u and right ones u, u in [0, 1) a golden-ratio sequence over the
        # image's position, so the kept wrong ones spread over the whole test set.
        position = batch_idx * len(y) + torch.arange(len(y), device=y.device)
        key = (pred != y).float() + (position * 0.6180339887) % 1
        parts = (x.detach(), y, pred, key)
        if self._wrong is not None:
            parts = tuple(torch.cat([old, new]) for old, new in zip(self._wrong, parts, strict=True))
        order = torch.topk(parts[3], min(self.num_misclassified, len(parts[3]))).indices
        self._wrong = tuple(p[order] for p in parts)

    # ------------------------------------------------------------------ pictures

    def _log_confusion_matrix(self, trainer, pl_module, logger: TensorBoardLogger, stage: str) -> None:
        c = pl_module.hparams.num_classes
        counts = self._matrix if self._matrix is not None else torch.zeros(c * c, dtype=torch.long)
        # (C, C): rows true, columns predicted; summed over the ranks (every rank takes part)
        matrix = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").view(c, c).cpu()
        self.matrices[stage] = matrix
        if trainer.is_global_zero and matrix.sum() > 0:
            figure = confusion_figure(matrix, pl_module.class_names, f"{stage}: step {trainer.global_step}")
            _add_png(logger, f"{stage}/confusion_matrix", figure, trainer.global_step)

    @torch.no_grad()
    def _log_fixed_batch(
        self, trainer: Trainer, pl_module: LightningModule, logger: TensorBoardLogger
    ) -> None:
        x, y, preds = (torch.cat(parts) for parts in zip(*self._picked, strict=True))
        step = trainer.global_step
        if self.inputs:
            figure = image_figure(
                _for_display(x, trainer), y.cpu(), preds.cpu(), pl_module.class_names, "inputs"
            )
            _add_png(logger, "val/inputs", figure, step)
        if self.feature_maps and isinstance(pl_module.net, nn.Sequential):
            maps, _ = layer_outputs(pl_module.net, x)
            for name, fmap in maps.items():
                grid = channel_grid(fmap[: self.feature_map_images], self.max_channels, size=16)
                _add_png(
                    logger, f"val/feature_maps/{name}", grid.mul(255).round().byte().permute(1, 2, 0), step
                )


def _logits(outputs) -> torch.Tensor | None:
    """(B, num_classes) logits an evaluation step returned as {"logits": ...}; None if it returned none."""
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"]
    rank_zero_warn(
        "TensorBoardDashboard: the evaluation step returned no {'logits': ...}, so no predictions."
    )
    return None


def _for_display(x: torch.Tensor, trainer: Trainer) -> torch.Tensor:
    """Model inputs -> [0, 1] pixels on the CPU, undoing the data module's normalization when it has one."""
    x = x.detach().float().cpu()
    data = trainer.datamodule
    if data is not None and getattr(data.hparams, "normalize", False) and hasattr(data, "mean_std"):
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in data.mean_std)
        x = x * std + mean
    return x.clamp(0, 1)


def _add_png(logger: TensorBoardLogger, tag: str, image, step: int) -> None:
    """Log an (H, W, 3) uint8 image, PNG-encoded at zlib level 1: ~3x faster than add_image's default."""
    image = np.asarray(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    encoded = Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3)
    encoded.encoded_image_string = buffer.getvalue()
    summary = Summary(value=[Summary.Value(tag=tag, image=encoded)])
    logger.experiment._get_file_writer().add_summary(summary, step)


def _tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def _run_hparams(trainer: Trainer, pl_module: LightningModule) -> dict:
    """The model's and the data's hyperparameters that are numbers, flags or words, for the HParams tab.

    Unset ones (None), lists and dicts (class names, checksums) are left out: hparams.yaml has them all.
    """
    params = dict(pl_module.hparams_initial)
    if trainer.datamodule is not None:
        params.update(trainer.datamodule.hparams_initial)
    return {
        k: v
        for k, v in params.items()
        if not k.startswith("_")  # Lightning's own bookkeeping (e.g. the CLI's instantiator)
        and isinstance(v, bool | int | float | str)
    }


def _write_hparams(logger: TensorBoardLogger, params: dict) -> None:
    # TensorBoardLogger.log_hyperparams(params, metrics) would also log each metric's starting value
    # as a fake point of its scalar series; here the metrics are only declared, and the HParams tab
    # reads their values from the real series (val/acc_best every epoch, test/acc after testing).
    writer = logger.experiment._get_file_writer()
    for summary in hparams_summary(params, dict.fromkeys(HPARAMS_METRICS, 0.0)):
        writer.add_summary(summary)
