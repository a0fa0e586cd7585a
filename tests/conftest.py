"""Tiny data sets written by the tests, in each on-disk format the project reads."""

import hashlib
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

CLASSES = ["cat", "dog", "ship"]


def write_image_folder(root: Path, per_class: int = 20, test_per_class: int = 4, fmt: str = "png") -> Path:
    """root/train/<class>/*.png (and root/test/...): random 32x32 RGB images, label-dependent tint."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        if n == 0:
            continue
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = torch.randint(0, 128, (3, 32, 32), generator=g, dtype=torch.uint8)
                img[label] += 100  # a learnable signal: the class shows in one channel's brightness
                pil = Image.fromarray(img.permute(1, 2, 0).numpy())
                pil.save(folder / f"{i:04d}.{fmt}", **({"quality": 95} if fmt == "jpg" else {}))
    return root


def write_batches(root: Path, per_batch: int = 12, test: int = 12) -> tuple[Path, dict[str, str]]:
    """root/cifar-10-batches-py in CIFAR-10's pickle layout; returns (root, md5 per file name)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        labels = torch.randint(0, 10, (n,), generator=g)
        data = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8)
        entry = {"batch_label": name, "labels": labels.tolist(), "data": data.numpy(), "filenames": []}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {
        "label_names": [
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ]
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    return root, md5s


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder with its own user cache: nothing leaks between tests."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def batches(tmp_path) -> tuple[Path, dict[str, str]]:
    return write_batches(tmp_path / "pickles")


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer that writes nothing: no logger, checkpoints, progress bar or summary."""
    settings = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**settings, **kwargs})
