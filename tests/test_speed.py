"""What keeps the training step fast: no host-device sync per step, nothing rebuilt per batch.

(How fast it is, is measured by scripts/benchmark.py and scripts/speed_e2e.py, never by a test.)
"""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger

from lit_cifar import CIFARClassifier, CIFARDataModule
from lit_cifar.dashboard import TensorBoardDashboard
from lit_cifar.data import MEAN_STD
from lit_cifar.divergence import DivergenceGuard


def test_normalization_constants_are_made_once_per_device(monkeypatch):
    data = CIFARDataModule()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in MEAN_STD["cifar10"])
    expected = (x.float() / 255 - mean) / std
    torch.testing.assert_close(data.to_float(x), expected)  # the first batch makes them

    made = []
    real_tensor = torch.tensor
    monkeypatch.setattr(
        torch, "tensor", lambda *args, **kwargs: made.append(args) or real_tensor(*args, **kwargs)
    )
    for _ in range(3):
        torch.testing.assert_close(data.to_float(x), expected)
    assert made == []  # later batches reuse them: on a GPU, no copy (and no wait) per batch
    assert data.normalization(torch.device("cpu"))[0].shape == (1, 3, 1, 1)


class SyncFreeSteps(Callback):
    """torch.cuda sync debug mode "error" from the end of the first training (validation) batch to the
    end of the epoch's last one: it covers the steps in between whole, from fetching and moving the
    batch (transfer, augmentation, normalization) to the callbacks after the optimizer step."""

    def __init__(self) -> None:
        self.checked = {"train": 0, "val": 0}

    def _on(self, stage: str) -> None:
        torch.cuda.set_sync_debug_mode("error")
        self.checked[stage] += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")
        if batch_idx + 1 < trainer.num_training_batches:
            self._on("train")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        torch.cuda.set_sync_debug_mode("default")
        if not trainer.sanity_checking and batch_idx + 1 < trainer.num_val_batches[0]:
            self._on("val")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_and_validation_steps_never_wait_for_the_gpu(image_folder, tmp_path):
    data = CIFARDataModule(str(image_folder), batch_size=4, val_size=16)
    model = CIFARClassifier(num_classes=3)
    sync_free = SyncFreeSteps()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=4,
        log_every_n_steps=50,  # the steps that write logs read values back; none among these
        logger=TensorBoardLogger(tmp_path),
        callbacks=[DivergenceGuard(), LearningRateMonitor(), TensorBoardDashboard(), sync_free],
        enable_model_summary=False,
    )
    try:
        trainer.fit(model, datamodule=data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sync_free.checked == {"train": 5, "val": 3}  # every step after the first ran in "error" mode
    assert trainer.global_step == 6
