"""What the tests share: tiny data sets in each on-disk format the project reads, the scripts as
modules, entry points and processes, TensorBoard's view of a run folder, and a clean process per test."""

import hashlib
import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_cifar.errors import TRACEBACK_ENV

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "ship"]
CIFAR10_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()


# ---------------------------------------------------------------------------- data on disk


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


def md5s_of(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def random_batch(n: int, num_classes: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random images (n, 3, 32, 32) uint8 and their random labels (n,)."""
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8), labels


def write_pickles(root: Path, batches: list, classes: list[str]) -> tuple[Path, dict[str, str]]:
    """CIFAR's pickles as the official archives unpack: for 10 classes root/cifar-10-batches-py (five
    training batches, then test_batch), for 100 root/cifar-100-python (train, then test). `batches`:
    each file's (images (n, 3, 32, 32) uint8, labels (n,)), in that order. Returns (root, md5 per file)."""
    if len(classes) == 10:
        folder, key, meta = root / "cifar-10-batches-py", "labels", ("batches.meta", "label_names")
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        folder, key, meta = root / "cifar-100-python", "fine_labels", ("meta", "fine_label_names")
        names = ["train", "test"]
    folder.mkdir(parents=True)
    for name, (x, y) in zip(names, batches, strict=True):
        (folder / name).write_bytes(pickle.dumps({"data": x.flatten(1).numpy(), key: y.tolist()}))
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: classes}))
    return root, md5s_of(folder)


def write_batches(root: Path, per_batch: int = 12, test: int = 12) -> tuple[Path, dict[str, str]]:
    """root/cifar-10-batches-py of random images with random labels; returns (root, md5 per file name)."""
    g = torch.Generator().manual_seed(1)
    return write_pickles(root, [random_batch(n, 10, g) for n in [per_batch] * 5 + [test]], CIFAR10_CLASSES)


def checksum_config(md5s: dict[str, str]) -> str:
    """--config= a file giving the tests' own md5s: verification stays on, against these."""
    Path("checksums.yaml").write_text(
        "data:\n  checksums:\n" + "".join(f"    {k}: {v}\n" for k, v in md5s.items())
    )
    return "--config=checksums.yaml"


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def batches(tmp_path) -> tuple[Path, dict[str, str]]:
    return write_batches(tmp_path / "pickles")


# ---------------------------------------------------------------------------- running things


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder with its own user cache, and entry points called in this
    process see only their own arguments; environment variables they set (seed_everything's PL_*)
    do not leak into other tests."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["lit-cifar"])
    with mock.patch.dict(os.environ):
        yield


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


def load_script(name: str):
    """scripts/<name>.py as a module: its main() runs in this process (no interpreter start) and can be patched."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *argv: str) -> None:
    """`python scripts/<name>.py *argv`, in this process."""
    module = load_script(name)
    parse = getattr(module, "parse_args", None) or module.get_args_parser().parse_args  # train.py's own
    module.main(parse(list(argv)))


def error_of(fn, *args) -> str:
    """The message an entry point exits with (it must exit with a message, not a traceback)."""
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    assert isinstance(exc.value.code, str), f"exit code {exc.value.code!r}, expected an error message"
    return exc.value.code


def run(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """A command in a new process, as a user types it; with `check`, it must succeed."""
    proc = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


# ---------------------------------------------------------------------------- TensorBoard


def events(log_dir: Path) -> dict:
    """A run folder as TensorBoard reads it: {"scalars": {tag: [(step, value)]}, "images": {tag: [image
    events]}, "hparams": {tag: content}, "graph": bool}, over all its event files in order. A resumed run's
    purge_step (a SessionLog START event) drops the points the killed run wrote at that step or later,
    i.e. after its checkpoint; any other point logged twice shows twice."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    try:
        hparams = acc.PluginTagToContent("hparams")
    except KeyError:  # no hparams summary in the folder
        hparams = {}
    return {
        "scalars": {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]},
        "images": {t: acc.Images(t) for t in tags["images"]},
        "hparams": hparams,
        "graph": tags["graph"],
    }
