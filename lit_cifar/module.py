"""CIFARClassifier: the LightningModule around a named network: loss, metrics, AdamW, logging.

python -c "from lit_cifar import CIFARClassifier; print(CIFARClassifier('seed'))"
"""

import math

import lightning as L
import torch
from torch.nn import functional as F
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from lit_cifar.errors import UserError, check_number
from lit_cifar.nets import NETS, build_net

SCHEDULES = ("constant", "onecycle")


class CIFARClassifier(L.LightningModule):
    def __init__(
        self,
        net: str = "seed",
        num_classes: int = 10,
        class_names: list[str] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 5e-2,
        label_smoothing: float = 0.1,
        schedule: str = "onecycle",
        warmup_fraction: float = 0.2,
        channels_last: bool = True,
        compile: bool = False,
        flip_tta: bool = False,
    ) -> None:
        """Defaults: the default recipe (README, "Accuracy"); the seed's own are configs/seed.yaml.

        Args:
            net: network name, one of `lit_cifar.nets.NETS` (seed, seed_bn).
            num_classes: outputs of the last layer; the CLI takes it from the data.
            class_names: the classes' names in label order, for prediction and figures.
            lr: AdamW learning rate (the peak rate when a schedule is on).
            weight_decay: AdamW decoupled weight decay.
            label_smoothing: CrossEntropyLoss label smoothing, training loss only.
            schedule: constant (the seed's) or onecycle: linear warm-up from lr/25, cosine decay to 0.
            warmup_fraction: fraction of all steps spent warming up (onecycle).
            channels_last: NHWC memory format for the net and its inputs (faster convs on most devices).
            compile: torch.compile the net.
            flip_tta: at evaluation and prediction, average the logits of each image and its mirror image.
        """
        super().__init__()
        if net not in NETS:
            raise UserError(f"unknown network {net!r}: choose one of {', '.join(NETS)}.")
        check_number("num_classes", num_classes, 1)
        if num_classes < 2:
            raise UserError(
                f"num_classes is {num_classes}: a classifier needs at least two classes to tell apart "
                f"(image folders: at least two train/<class>/ folders)."
            )
        check_number("lr", lr, 0, open_low=True)
        check_number("weight_decay", weight_decay, 0)
        check_number("label_smoothing", label_smoothing, 0, 1, open_high=True)
        check_number("warmup_fraction", warmup_fraction, 0, 1, open_high=True)
        if schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}.")
        if class_names is not None and len(class_names) != num_classes:
            raise UserError(f"{len(class_names)} class names for {num_classes} classes.")
        self.save_hyperparameters()
        self.class_names = class_names or [str(i) for i in range(num_classes)]  # for tables and figures
        self.net = build_net(net, num_classes)
        self.example_input_array = torch.zeros(1, 3, 32, 32)  # the summary shows each layer's shapes
        # validate_args=False: the input checks call torch.unique, a host-device sync every step.
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = self.val_acc.clone()
        self.test_acc_per_class = MulticlassAccuracy(num_classes, average=None)  # (C,): each class's recall
        self.val_acc_best = MaxMetric()
        # The epoch's (loss x images, correct predictions, images), summed on the device. (MeanMetric
        # syncs to check each update for NaN; its nan_strategy="disable" needs torchmetrics >= 1.7.)
        self.register_buffer("train_sums", torch.zeros(3), persistent=False)

    def configure_model(self) -> None:
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        # Lightning calls this at every fit/validate/test in the process: compile once, not at each.
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net.compile()  # in place: the state_dict keys stay those of the plain net
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 3, 32, 32) normalized images -> (B, num_classes) logits
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # log_graph traces the plain net's forward: a compiled one cannot be traced
        return self.net.forward(x) if torch.jit.is_tracing() else self.net(x)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation: (B, num_classes), with mirror-image averaging when flip_tta is on."""
        logits = self(x)
        return (logits + self(x.flip(3))) / 2 if self.hparams.flip_tta else logits

    def _step(self, batch, stage: str) -> torch.Tensor | dict[str, torch.Tensor]:
        x, y = batch  # (B, 3, 32, 32), (B,)
        if stage == "train":
            logits = self(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
            self._log_train(loss, logits, y)
            return loss
        logits = self.evaluate(x)
        loss = F.cross_entropy(logits, y)
        acc = getattr(self, f"{stage}_acc")
        acc(logits, y)
        if stage == "test":
            self.test_acc_per_class.update(logits, y)
        self.log(f"{stage}/loss", loss, sync_dist=True)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val")
        # What callbacks read as `outputs` (the dashboard's predictions): the logits scored here.
        return {"loss": loss, "logits": logits.detach()}  # (), (B, num_classes)

    def _log_train(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        # A self.log call is Python work every step: the step only adds to train_sums on the device (no
        # sync), logs train/loss_step every log_every_n_steps and the epoch's values at its end.
        images = torch.full_like(loss, len(y), dtype=torch.float32)  # float32 whatever the precision
        correct = (logits.argmax(1) == y).sum().float()
        self.train_sums.add_(torch.stack((loss.detach().float() * images, correct, images)))
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss, sync_dist=True)  # DDP: the mean over all ranks

    def on_train_epoch_end(self) -> None:
        # Summed over all DDP ranks, so equal on every rank: sync_dist only stops Lightning's DDP warning.
        loss_sum, correct, images = self.trainer.strategy.reduce(self.train_sums.clone(), reduce_op="sum")
        if images > 0:  # none when no batch was trained
            self.log("train/loss_epoch", loss_sum / images, sync_dist=True)
            self.log("train/acc", correct / images, sync_dist=True)
        self.train_sums.zero_()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self.evaluate(x).softmax(dim=-1)  # (B, num_classes) class probabilities

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_acc_best(self.val_acc.compute())
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        for name, acc in zip(self.class_names, self.test_acc_per_class.compute(), strict=True):
            self.log(f"test/acc_{name}", acc)  # one row per class in the results table
        self.test_acc_per_class.reset()

    # state_dict() stays the weights only (export, prediction and check_fits compare it with the net);
    # the running sums and the best val/acc go in the checkpoint under "metric_state", so that a run
    # resumed mid-epoch logs what the uninterrupted run would.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sums = self.trainer.strategy.reduce(self.train_sums.clone(), reduce_op="sum")  # every rank's share
        best = self.val_acc_best.metric_state["max_value"]
        checkpoint["metric_state"] = {"train_sums": sums.cpu(), "val_acc_best": best.cpu()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("metric_state")
        if state is None:  # written before these were saved
            return
        # rank 0 carries the sums of all ranks so far; each rank adds its own from here
        self.train_sums.copy_(state["train_sums"] if self.global_rank == 0 else torch.zeros(3))
        self.val_acc_best.reset()
        self.val_acc_best.update(state["val_acc_best"])

    def configure_optimizers(self):
        hp = self.hparams
        fused = self.device.type in ("cuda", "cpu")  # one kernel for all parameters
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
        if hp.schedule == "constant":
            return optimizer
        total = self.trainer.estimated_stepping_batches
        warmup = max(1, int(hp.warmup_fraction * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: one_cycle(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def one_cycle(step: int, warmup: int, total: int, start: float = 1 / 25) -> float:
    """LR factor: linear from `start` to 1 over `warmup` steps, then cosine down to 0 at `total`."""
    if step < warmup:
        return start + (1 - start) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
