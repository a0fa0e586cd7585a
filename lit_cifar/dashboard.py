"""TensorBoardDashboard: the callback that draws the run's pictures and fills TensorBoard's HParams tab.
A switch per picture, then the dashboard:

    lit-cifar fit --dashboard.feature_maps false
    tensorboard --logdir lightning_logs
"""

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.tensorboard.summary import hparams as hparams_summary

from lit_cifar.errors import UserError
from lit_cifar.figures import channel_grid, confusion_figure, image_figure, layer_outputs

# The HParams tab's metric columns: the values are the last points of the scalar series of these tags.
HPARAMS_METRICS = ("val/acc_best", "test/acc")


class TensorBoardDashboard(Callback):
    """Pictures of what the evaluation steps predicted (the logits they return), and the HParams tab."""

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
        self.matrices: dict[str, torch.Tensor] = {}  # the last confusion matrix per stage: (C, C) counts
        self._wrong: tuple[torch.Tensor, ...] | None = None  # test: (x, y, pred, key), at most K rows
        self._hparams_written: set[str] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if stage == "predict":  # nothing to show
            return
        if self._logger is None:
            wanted = any(
                (self.inputs, self.feature_maps, self.confusion_matrix, self.misclassified, self.hparams)
            )
            if wanted and not trainer.fast_dev_run:  # fast_dev_run turns the logger off on purpose
                rank_zero_warn("TensorBoardDashboard writes nothing: the trainer has no TensorBoardLogger.")
        elif self.hparams and trainer.is_global_zero and self._logger.log_dir not in self._hparams_written:
            _write_hparams(self._logger, trainer, pl_module)  # once per run folder (fit, then test)
            self._hparams_written.add(self._logger.log_dir)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        c = pl_module.hparams.num_classes
        self._matrix = torch.zeros(c * c, dtype=torch.long, device=pl_module.device)  # true * C + predicted
        self._wrong, self._picked = None, []  # _picked: (x, y, pred) of the first validation images

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if not trainer.sanity_checking:
            self._collect("val", *args)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self._collect("test", *args)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_epoch("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch("test", trainer, pl_module)

    def _collect(self, stage: str, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # On the device, without host syncs: counts, a few first images, a running pick of wrong ones.
        if self._logger is None:
            return
        logits = outputs["logits"]  # (B, C): what the step scored (with flip_tta, not what a hook would see)
        (x, y), preds, c = batch[:2], logits.argmax(1), logits.shape[1]
        if self.confusion_matrix:  # index_add_: a GPU's bincount reads its input's max on the host
            self._matrix.index_add_(0, y * c + preds, torch.ones_like(y))
        if stage == "test" and self.misclassified:
            self._keep_wrong(x, y, preds, batch_idx)
        k = self.num_images - sum(len(p[1]) for p in self._picked)
        if stage == "val" and dataloader_idx == 0 and k > 0 and (self.inputs or self.feature_maps):
            self._picked.append((x[:k].detach().clone(), y[:k], preds[:k]))

    def _keep_wrong(self, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, batch_idx: int) -> None:
        # A running pick of K images in fixed shapes: the top K keys, where wrong images score 1 + u and
        # right ones u, u in [0, 1) a golden-ratio sequence over the image's position, so the kept wrong
        # ones spread over the whole test set.
        position = batch_idx * len(y) + torch.arange(len(y), device=y.device)
        key = (pred != y).float() + (position * 0.6180339887) % 1
        parts = (x.detach(), y, pred, key)
        if self._wrong is not None:
            parts = tuple(torch.cat([old, new]) for old, new in zip(self._wrong, parts, strict=True))
        order = torch.topk(parts[3], min(self.num_misclassified, len(parts[3]))).indices
        self._wrong = tuple(p[order] for p in parts)

    @torch.no_grad()
    def _log_epoch(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._logger is None:
            return
        names, step = pl_module.class_names, trainer.global_step

        def show(tag: str, image: torch.Tensor) -> None:  # (H, W, 3): uint8, or float in [0, 1]
            self._logger.experiment.add_image(f"{stage}/{tag}", image, step, dataformats="HWC")

        if self.confusion_matrix:  # (C, C): rows true, columns predicted; summed over the ranks (all join)
            c = pl_module.hparams.num_classes
            matrix = trainer.strategy.reduce(self._matrix, reduce_op="sum").view(c, c).cpu()
            self.matrices[stage] = matrix
            if trainer.is_global_zero and matrix.sum() > 0:
                show("confusion_matrix", confusion_figure(matrix, names, f"{stage}: step {step}"))
        if not trainer.is_global_zero:
            return
        if self._picked:
            x, y, preds = (torch.cat(parts) for parts in zip(*self._picked, strict=True))
            if self.inputs:
                show("inputs", image_figure(_for_display(x, trainer), y.cpu(), preds.cpu(), names, "inputs"))
            if self.feature_maps:
                for name, fmap in layer_outputs(pl_module.net, x)[0].items():
                    grid = channel_grid(fmap[: self.feature_map_images], self.max_channels, size=16)
                    show(f"feature_maps/{name}", grid.permute(1, 2, 0))
        if self._wrong is not None:
            x, y, pred, key = (t.cpu() for t in self._wrong)  # the one host sync of the test epoch
            if (wrong := key >= 1).any():
                images = _for_display(x[wrong], trainer)
                show("misclassified", image_figure(images, y[wrong], pred[wrong], names, "misclassified"))


def _for_display(x: torch.Tensor, trainer: Trainer) -> torch.Tensor:
    """Model inputs -> [0, 1] pixels on the CPU, undoing the data module's normalization when it has one."""
    x = x.detach().float().cpu()
    data = trainer.datamodule
    if data is not None and getattr(data.hparams, "normalize", False) and hasattr(data, "mean_std"):
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in data.mean_std)
        x = x * std + mean
    return x.clamp(0, 1)


def _write_hparams(logger: TensorBoardLogger, trainer: Trainer, pl_module: LightningModule) -> None:
    # The model's and the data's settings that are numbers, flags or words (hparams.yaml has them all),
    # without Lightning's own ("_" names). TensorBoardLogger.log_hyperparams(params, metrics) would log
    # each metric's starting value as a fake point of its series: here the metrics are only declared,
    # and the HParams tab reads their values from the real series.
    data = trainer.datamodule.hparams_initial if trainer.datamodule else {}
    params = {**pl_module.hparams_initial, **data}.items()
    plain = {k: v for k, v in params if not k.startswith("_") and isinstance(v, bool | int | float | str)}
    for summary in hparams_summary(plain, dict.fromkeys(HPARAMS_METRICS, 0.0)):
        logger.experiment.file_writer.add_summary(summary)
