"""The core: network, module, data module, both entry points, checkpoints, the split."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_cifar import CIFARClassifier, CIFARDataModule, build_net
from lit_cifar.data import split_indices

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def scalar_tags(log_dir: Path) -> set[str]:
    tags = set()
    for event_file in log_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_seed_net_is_the_seed():
    net = build_net("seed")
    assert sum(p.numel() for p in net.parameters()) == 89_578
    assert [type(m).__name__ for m in net] == [
        "Conv2d",
        "MaxPool2d",
        "Conv2d",
        "MaxPool2d",
        "Conv2d",
        "MaxPool2d",
        "Flatten",
        "Linear",
    ]
    assert net(torch.zeros(5, 3, 32, 32)).shape == (5, 10)


def test_seed_bn_has_batchnorm_and_relu_after_each_conv():
    names = [type(m).__name__ for m in build_net("seed_bn", num_classes=7)]
    assert names.count("BatchNorm2d") == 3 and names.count("ReLU") == 3
    assert build_net("seed_bn", 7)(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_split_is_seeded_disjoint_and_complete():
    train, val = split_indices(50_000, 0.1, seed=0)
    assert (len(train), len(val)) == (45_000, 5_000)
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(50_000))
    assert torch.equal(split_indices(50_000, 0.1, seed=0)[1], val)
    assert not torch.equal(split_indices(50_000, 0.1, seed=1)[1], val)
    assert len(split_indices(60, 6, seed=0)[1]) == 6  # a count works as well as a fraction


@pytest.mark.parametrize("source", ["image_folder", "batches"])
def test_train_script_fast_dev_run(source, request):
    data = request.getfixturevalue(source)
    data_dir = data[0] if isinstance(data, tuple) else data
    args = [
        sys.executable,
        str(REPO / "scripts/train.py"),
        "--accelerator",
        "cpu",
        "--data-dir",
        str(data_dir),
        "--fast-dev-run",
        "2",
    ]
    if isinstance(data, tuple):  # the tests' own pickles: give their checksums, verification stays on
        md5s = data[1]
        args += ["--config", write_checksum_config(md5s)]
    out = run(*args).stdout
    assert "test/acc" in out


def write_checksum_config(md5s: dict[str, str]) -> str:
    path = Path("checksums.yaml")
    path.write_text("data:\n  checksums:\n" + "".join(f"    {k}: {v}\n" for k, v in md5s.items()))
    return str(path)


@pytest.mark.parametrize("source", ["image_folder", "batches"])
def test_cli_fast_dev_run(source, request):
    data = request.getfixturevalue(source)
    data_dir = data[0] if isinstance(data, tuple) else data
    args = [
        "lit-cifar",
        "fit",
        "--trainer.accelerator=cpu",
        f"--data.data_dir={data_dir}",
        "--trainer.fast_dev_run=2",
    ]
    if isinstance(data, tuple):
        args.append(f"--config={write_checksum_config(data[1])}")
    run(*args)


def test_train_script_one_epoch_writes_logs_and_checkpoint(image_folder):
    out = run(
        sys.executable,
        str(REPO / "scripts/train.py"),
        "--accelerator",
        "cpu",
        "--data-dir",
        str(image_folder),
        "--max-epochs",
        "1",
    ).stdout
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("test/acc ") and "best checkpoint: " in summary
    log_dir = Path("lightning_logs/version_0")
    tags = scalar_tags(log_dir)
    assert any(t.startswith("train/loss") for t in tags) and "val/acc" in tags, tags
    assert (log_dir / "config.yaml").exists()
    assert (log_dir / "checkpoints/last.ckpt").exists()


def test_print_config_round_trips(image_folder):
    printed = run("lit-cifar", "fit", "--print_config").stdout
    Path("printed.yaml").write_text(printed)
    run(
        "lit-cifar",
        "fit",
        "--config=printed.yaml",
        f"--data.data_dir={image_folder}",
        "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu",
    )


def test_module_overfits_one_batch(image_folder):
    L.seed_everything(0)
    data = CIFARDataModule(str(image_folder), batch_size=64, augment=False, val_size=4)
    model = CIFARClassifier("seed", num_classes=3, lr=3e-3)
    trainer = quiet_trainer(max_epochs=60, overfit_batches=1, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert trainer.callback_metrics["train/acc"].item() == 1.0


def test_checkpoint_round_trip_needs_no_arguments(image_folder):
    data = CIFARDataModule(str(image_folder), val_size=6)
    model = CIFARClassifier("seed_bn", num_classes=3, class_names=["cat", "dog", "ship"], lr=2e-3)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint("model.ckpt")
    loaded = CIFARClassifier.load_from_checkpoint("model.ckpt", weights_only=True)
    assert loaded.hparams.net == "seed_bn" and loaded.class_names == ["cat", "dog", "ship"]
    x = torch.randn(4, 3, 32, 32)
    model.eval(), loaded.eval()
    assert torch.allclose(model(x), loaded(x))
