"""Reliability: kill/resume, DDP on two CPU ranks, safe checkpoint loading, divergence, bad command lines.

python -m pytest tests/test_reliability.py -q            (the slow ones spawn real processes)
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, error_of, events, run, run_script
from torch.nn import functional as F

from lit_cifar import CIFARClassifier, CIFARDataModule, build_net
from lit_cifar.checkpoints import SafeCheckpointIO, load_checkpoint
from lit_cifar.cli import LitCifarCLI
from lit_cifar.cli import main as cli_main
from lit_cifar.loaders import TensorLoader

LAST = Path("lightning_logs/version_0/checkpoints/last.ckpt")
# 60 training images (conftest), 12 held out: 48 train = 6 steps of 8 per epoch, 12 steps in all.
TINY = [
    "--trainer.accelerator=cpu",
    "--data.batch_size=8",
    "--data.val_size=12",
    "--trainer.max_epochs=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--last_checkpoint.every_n_train_steps=2",
]


def train_main(*argv: str) -> None:
    run_script("train", *argv)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# ---------------------------------------------------------------------------- the loader's state


def test_tensor_loader_resumes_mid_epoch_with_the_same_batches_and_random_draws():
    images, labels = torch.arange(40).view(40, 1), torch.arange(40)

    def draw(x, generator):  # stands for the crops and flips: random draws from the loader's generator
        return x + torch.randint(0, 1000, x.shape, generator=generator)

    loader = TensorLoader(images, labels, batch_size=4, shuffle=True, seed=3, augment=draw)
    list(loader)  # epoch 0
    it = iter(loader)
    seen = [next(it)[1] for _ in range(3)]  # epoch 1: three steps trained, then a checkpoint
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches_done": 3}  # its place is all it needs: no random state
    rest = list(it)

    torch.manual_seed(123)  # a new process: other random state, a new loader
    resumed = TensorLoader(images, labels, batch_size=4, shuffle=True, seed=3, augment=draw)
    resumed.load_state_dict(state)
    got = list(resumed)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, rest, strict=True))
    assert torch.equal(torch.cat(seen + [b[1] for b in got]).sort().values, labels)  # the epoch, each once


def test_tensor_loader_saved_at_epoch_end_starts_the_next_epoch():
    images, labels = torch.zeros(10, 1), torch.arange(10)
    loader = TensorLoader(images, labels, batch_size=4, shuffle=True)
    first = [b[1] for b in loader]
    state = loader.state_dict()
    resumed = TensorLoader(images, labels, batch_size=4, shuffle=True)
    resumed.load_state_dict(state)
    second = [b[1] for b in resumed]
    assert resumed.epoch == 1 and len(second) == 3
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # epoch 1's order


# ---------------------------------------------------------------------------- atomic checkpoint writes


def test_a_crash_inside_a_checkpoint_write_keeps_the_old_checkpoint(monkeypatch):
    io, path = SafeCheckpointIO(), Path("ckpts/last.ckpt")
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, path)
    real_save = torch.save

    def crash_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # some bytes reach the disk, then the process "dies"
        raise OSError("simulated crash in the middle of the write")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="simulated"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 6}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = load_checkpoint(path)
    assert ckpt["global_step"] == 4 and torch.equal(ckpt["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no partial file left


KEEP_SAVING = """
import io, sys, time, torch
from lit_cifar.checkpoints import SafeCheckpointIO

real_save = torch.save

def slow_save(obj, f):  # a slow disk: half the bytes, a pause, the rest
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print("half written", flush=True)
    time.sleep(0.2)
    f.write(data[len(data) // 2 :])

torch.save = slow_save
for step in range(100):
    ckpt = {"state_dict": {"w": torch.full((100_000,), step)}, "global_step": step}
    SafeCheckpointIO().save_checkpoint(ckpt, "last.ckpt")
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_a_loadable_checkpoint():
    proc = subprocess.Popen([sys.executable, "-c", KEEP_SAVING], stdout=subprocess.PIPE, text=True)
    try:
        for count, _ in enumerate(proc.stdout, start=1):  # two saves complete; kill the third half way
            if count == 3:
                proc.send_signal(signal.SIGKILL)
                break
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    assert 0 < Path("last.ckpt.partial").stat().st_size < Path("last.ckpt").stat().st_size  # torn
    ckpt = load_checkpoint("last.ckpt")
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.full((100_000,), 1))


# ---------------------------------------------------------------------------- kill and resume

KILLER = """
import os, runpy, signal, sys
import lightning.pytorch as pl
from lit_cifar.cli import LitCifarCLI

STEP, SIGNAL = int(os.environ["KILL_AT_STEP"]), getattr(signal, os.environ["KILL_SIGNAL"])


class KillAtStep(pl.Callback):
    # Signal this process right after training step STEP (before that step's checkpoint).
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == STEP:
            os.kill(os.getpid(), SIGNAL)


# Added to every Trainer from outside, as a real kill comes: the run's settings never see it.
instantiate_trainer = LitCifarCLI.instantiate_trainer


def with_killer(self, **kwargs):
    trainer = instantiate_trainer(self, **kwargs)
    trainer.callbacks.insert(0, KillAtStep())
    return trainer


LitCifarCLI.instantiate_trainer = with_killer
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
LIT_CIFAR = shutil.which("lit-cifar")


def killed_run(script: str, args: list[str], step: int, sig: str = "SIGKILL") -> subprocess.CompletedProcess:
    """Run `script args` in a process that sends itself `sig` after training step `step`."""
    Path("killer.py").write_text(KILLER)
    env = {"KILL_AT_STEP": str(step), "KILL_SIGNAL": sig}
    proc = run(sys.executable, "killer.py", script, *args, env=env, check=False)
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    return events(log_dir)["scalars"]


def assert_same_scalars(got: Path, want: Path) -> None:
    """Every tag, every step, once each, values equal within float tolerance."""
    a, b = scalars(got), scalars(want)
    assert sorted(a) == sorted(b)
    for tag, points in b.items():
        assert [s for s, _ in a[tag]] == [s for s, _ in points], tag  # no point missing or twice
        assert [v for _, v in a[tag]] == pytest.approx([v for _, v in points], rel=1e-5, abs=1e-6), tag


@pytest.mark.slow
def test_cli_sigkill_twice_then_ckpt_path_last_ends_and_logs_as_if_never_interrupted(image_folder, capsys):
    args = ["fit", f"--data.data_dir={image_folder}", *TINY]
    cli_main([*args, "--trainer.default_root_dir=uninterrupted"])
    run_dir = Path("lightning_logs/version_0")

    killed_run(LIT_CIFAR, args, step=3)  # inside the first epoch: last.ckpt from step 2
    ckpt = load_checkpoint(LAST)
    assert (ckpt["global_step"], ckpt["epoch"]) == (2, 0)
    config = (run_dir / "config.yaml").read_bytes()
    killed_run(LIT_CIFAR, [*args, "--ckpt_path=last"], step=9)  # resumed, killed in epoch 1: step 8
    assert load_checkpoint(LAST)["global_step"] == 8

    cli_main([*args, "--ckpt_path=last"])
    assert f"resuming from {LAST}" in capsys.readouterr().err
    assert os.listdir("lightning_logs") == ["version_0"]  # the same run folder, no new version
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 3
    assert (run_dir / "config.yaml").read_bytes() == config  # as the run wrote it
    assert load_checkpoint(LAST)["global_step"] == 12
    assert_same_weights(LAST, Path("uninterrupted") / LAST)  # bit for bit, augmentation included
    assert_same_scalars(run_dir, Path("uninterrupted") / run_dir)
    assert {"train/loss_epoch", "train/acc", "val/acc_best", "lr-AdamW"} <= set(scalars(run_dir))


@pytest.mark.slow
def test_train_script_sigkill_in_second_epoch_then_resume_ends_as_if_never_interrupted(image_folder):
    flags = ["--data-dir", str(image_folder), "--accelerator", "cpu", "--batch-size", "8", "--val-size", "12"]
    flags += ["--max-epochs", "2", "--config", "steps.yaml"]
    Path("steps.yaml").write_text(
        "trainer: {log_every_n_steps: 1, enable_progress_bar: false}\n"
        "last_checkpoint: {every_n_train_steps: 2}\n"
    )
    train_main(*flags, "--default-root-dir", "uninterrupted")

    killed_run(str(REPO / "scripts/train.py"), flags, step=9)  # last.ckpt: step 8
    assert load_checkpoint(LAST)["global_step"] == 8

    train_main(*flags, "--resume")
    assert os.listdir("lightning_logs") == ["version_0"]
    assert load_checkpoint(LAST)["global_step"] == 12
    assert_same_weights(LAST, Path("uninterrupted") / LAST)
    assert_same_scalars(LAST.parents[1], Path("uninterrupted") / LAST.parents[1])


@pytest.mark.slow
def test_sigterm_exits_non_zero_with_a_message_and_the_run_resumes(image_folder):
    args = ["fit", f"--data.data_dir={image_folder}", *TINY]
    proc = killed_run(LIT_CIFAR, args, step=5, sig="SIGTERM")  # a preempted node's notice
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM before the run finished.")
    )
    assert load_checkpoint(LAST)["global_step"] == 4  # nothing written at the signal
    cli_main([*args, "--ckpt_path=last"])
    assert load_checkpoint(LAST)["global_step"] == 12 and os.listdir("lightning_logs") == ["version_0"]


def test_resume_with_no_previous_run_is_a_clear_error(image_folder):
    message = error_of(cli_main, ["fit", f"--data.data_dir={image_folder}", "--ckpt_path=last"])
    assert message.startswith("error: nothing to resume: no lightning_logs/*/checkpoints/last.ckpt")
    message = error_of(train_main, "--data-dir", str(image_folder), "--resume")
    assert message.startswith("error: nothing to resume")
    assert not Path("lightning_logs").exists()


# ---------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_ddp_on_two_cpu_ranks_matches_one_process(image_folder):
    # Without augmentation both runs see the same images in each global step: rank r's batch j
    # is every other image of the single run's batch j (global batch 16 = 2 ranks x 8).
    args = ["fit", f"--data.data_dir={image_folder}", *TINY, "--data.augment=false", "--model.net=seed"]
    cli_main([*args, "--data.batch_size=16", "--trainer.default_root_dir=single"])
    run("lit-cifar", *args, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.default_root_dir=ddp")
    single, ddp = weights(Path("single") / LAST), weights(Path("ddp") / LAST)
    for key in single:
        assert torch.allclose(single[key], ddp[key], rtol=1e-4, atol=1e-6), key

    # What rank 0 logged is the whole validation set's value (both shards synchronized)...
    data = CIFARDataModule(str(image_folder), val_size=12)
    data.setup("fit")
    x, y = data.data["val"]
    model = CIFARClassifier.load_from_checkpoint(Path("ddp") / LAST, weights_only=True).eval()
    with torch.no_grad():
        logits = model(data.to_float(x))
    acc, loss = (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()
    # ... and it is the single process's value.
    for run_dir in ("ddp", "single"):
        logged = scalars(Path(run_dir) / "lightning_logs/version_0")
        assert logged["val/acc"][-1][1] == pytest.approx(acc, abs=1e-6), run_dir
        assert logged["val/loss"][-1][1] == pytest.approx(loss, rel=1e-4), run_dir

    # The dashboard under DDP: its hook sees the step outputs DDP redirects, the confusion matrix is
    # synchronized, and rank 0 alone writes the pictures, once an epoch.
    images = events(Path("ddp/lightning_logs/version_0"))["images"]
    assert {"val/confusion_matrix", "val/inputs"} <= set(images)
    assert len([tag for tag in images if tag.startswith("val/feature_maps/")]) == 6  # the seed's six layers
    assert len(images["val/confusion_matrix"]) == 2


# ---------------------------------------------------------------------------- safe loading


class MakesAFile:
    """Unpickling this (without weights_only) would create the file `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_crafted(path: str, marker: str) -> str:
    good = {"state_dict": {f"net.{k}": v for k, v in build_net("seed", 3).state_dict().items()}}
    torch.save({**good, "hyper_parameters": {"net": "seed", "num_classes": 3}, "x": MakesAFile(marker)}, path)
    return path


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused_by_every_entry_point(image_folder, tmp_path):
    marker = tmp_path / "code-ran"
    evil = write_crafted("evil.ckpt", str(marker))
    commands = {
        "lit-cifar fit": ["lit-cifar", "fit", f"--data.data_dir={image_folder}", f"--ckpt_path={evil}"],
        "lit-cifar predict": [
            "lit-cifar",
            "predict",
            f"--ckpt_path={evil}",
            f"--data.predict_dir={image_folder}",
        ],
        "train.py --resume": [sys.executable, str(REPO / "scripts/train.py"), "--resume", evil],
        "predict.py": [sys.executable, str(REPO / "scripts/predict.py"), evil, str(image_folder)],
        "export.py": [sys.executable, str(REPO / "scripts/export.py"), evil, "--format", "onnx"],
    }
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}  # fmt: skip
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 1, f"{name}: {err[-2000:]}"
        assert "Traceback" not in err, f"{name}: {err[-2000:]}"
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "evil.ckpt" in last, f"{name}: {last}"
        assert "(io.open)" in last and "code" in last, f"{name}: {last}"  # says what it refused, and why
    assert not marker.exists()


def test_unsafe_message_is_one_clear_paragraph(tmp_path):
    evil = write_crafted("evil.ckpt", str(tmp_path / "code-ran"))
    message = error_of(cli_main, ["test", f"--ckpt_path={evil}"])
    assert message == (
        "error: refused to load evil.ckpt: besides tensors and plain values it holds a Python object "
        "(io.open) that would run code when loaded. Checkpoints are read weights-only, so nothing "
        "in it ran. Use a checkpoint written by lit-cifar training; if you made this file yourself and "
        "trust it, load it in Python and save only its tensors and plain settings."
    )
    assert not (tmp_path / "code-ran").exists()


def write_not_checkpoints() -> dict[str, str]:
    Path("notes.ckpt").write_text("not a checkpoint at all\n")
    torch.save(torch.zeros(3), "tensor.pt")
    torch.save({"state_dict": {"net.0.weight": torch.zeros(1)}, "global_step": 1}, "whole.ckpt")
    Path("truncated.ckpt").write_bytes(Path("whole.ckpt").read_bytes()[:300])
    return {
        "notes.ckpt": "is not a PyTorch checkpoint, or it is truncated",
        "tensor.pt": "is a PyTorch file but not a Lightning checkpoint",
        "truncated.ckpt": "is not a PyTorch checkpoint, or it is truncated",
    }


def test_files_that_are_not_checkpoints_get_a_clear_error(image_folder):
    for name, expected in write_not_checkpoints().items():
        message = error_of(cli_main, ["fit", f"--data.data_dir={image_folder}", f"--ckpt_path={name}"])
        assert message.startswith(f"error: {name} {expected}"), message
        message = error_of(train_main, "--data-dir", str(image_folder), "--resume", name)
        assert message.startswith(f"error: {name} {expected}"), message


def test_a_checkpoint_of_another_network_gets_a_clear_error(image_folder):
    state = {f"net.{k}": v for k, v in build_net("seed_bn", 3).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"net": "seed_bn", "num_classes": 3}}, "bn.ckpt")
    # The file's hyperparameters are the run's settings: another net asked for is a changed setting.
    message = error_of(train_main, "--data-dir", str(image_folder), "--net", "seed", "--resume", "bn.ckpt")
    # (scripts/train.py names its own flag)
    assert message.splitlines()[1:] == ["  --net: 'seed_bn' in the run, 'seed' given"]
    # Without hyperparameters the CLI cannot take the network from the file: the same check speaks.
    torch.save({"state_dict": state}, "bare.ckpt")
    message = error_of(cli_main, ["fit", f"--data.data_dir={image_folder}", "--ckpt_path=bare.ckpt"])
    assert message.startswith(
        "error: bare.ckpt holds another network (?, ? classes) than the one set up (seed"
    )


# ---------------------------------------------------------------------------- divergence


def assert_stopped_at_divergence(message: str) -> None:
    assert message.startswith("error: training diverged: the "), message
    assert " at step " in message and "\n" not in message
    ckpt = load_checkpoint(LAST)  # the last good one, written before the NaN
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert (
        f"the last good checkpoint is kept: {os.path.join('.', LAST)} (step {ckpt['global_step']})" in message
    )


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(image_folder):
    args = ["fit", f"--data.data_dir={image_folder}", *TINY, "--last_checkpoint.every_n_train_steps=1"]
    assert_stopped_at_divergence(error_of(cli_main, [*args, "--model.lr=1e6"]))


@pytest.mark.slow
def test_train_script_lr_1e6_exits_non_zero_without_traceback(image_folder):
    Path("steps.yaml").write_text(
        "last_checkpoint: {every_n_train_steps: 1}\ntrainer: {log_every_n_steps: 1}\n"
    )
    train = [
        sys.executable,
        str(REPO / "scripts/train.py"),
        "--data-dir",
        str(image_folder),
        "--accelerator",
        "cpu",
    ]
    proc = run(*train, "--lr", "1e6", "--config", "steps.yaml", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_stopped_at_divergence(proc.stderr.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- bad command lines

BAD = [  # (lit-cifar flag, scripts/train.py flags, the message's start)
    ("--model.net=resnet", ["--net", "resnet"], "unknown network 'resnet'"),
    ("--model.lr=0", ["--lr", "0"], "lr must be positive"),
    ("--model.lr=-0.1", ["--lr", "-0.1"], "lr must be positive"),
    ("--data.batch_size=0", ["--batch-size", "0"], "batch_size must be at least 1"),
    ("--trainer.max_epochs=0", ["--max-epochs", "0"], "max_epochs must be at least 1"),
    ("--trainer.accelerator=tpux", ["--accelerator", "tpux"], "You selected an invalid accelerator name"),
    ("--ckpt_path=missing.ckpt", ["--resume", "missing.ckpt"], "no checkpoint at missing.ckpt"),
]
if not torch.cuda.is_available():
    BAD.append(("--trainer.accelerator=gpu", ["--accelerator", "gpu"], "accelerator 'gpu' asked for, but"))


@pytest.mark.parametrize(("cli_flag", "train_flags", "start"), BAD, ids=[b[0] for b in BAD])
def test_bad_command_lines_are_refused_before_any_work(image_folder, cli_flag, train_flags, start):
    message = error_of(cli_main, ["fit", f"--data.data_dir={image_folder}", cli_flag])
    assert message.startswith(f"error: {start}") and "\n" not in message, message
    message = error_of(train_main, "--data-dir", str(image_folder), *train_flags)
    assert message.startswith(f"error: {start}") and "\n" not in message, message
    assert not Path("lightning_logs").exists()  # nothing written


# ---------------------------------------------------------------------------- resumed with its own settings


@pytest.mark.slow
def test_resume_continues_with_the_runs_own_settings_and_refuses_others(image_folder, capsys):
    args = ["fit", f"--data.data_dir={image_folder}", *TINY, "--trainer.max_epochs=1"]
    cli_main([args[0], f"--config={REPO / 'configs/seed.yaml'}", *args[1:]])  # the seed recipe
    run_dir = LAST.parents[1]
    config, events = (run_dir / "config.yaml").read_bytes(), sorted(run_dir.glob("events.*"))

    # Resumed with the default flags: the run's settings, not the defaults (scripts/train.py's way).
    cli = LitCifarCLI(args=[f"--data.data_dir={image_folder}"], run=False, resume="last")
    assert (cli.model.hparams.lr, cli.model.hparams.schedule) == (1e-3, "constant")
    assert (cli.datamodule.hparams.normalize, cli.datamodule.hparams.batch_size) == (False, 8)
    assert cli.trainer.max_epochs == 1

    # Settings that change what is trained are refused, each named, before anything is written.
    message = error_of(cli_main, [*args, "--ckpt_path=last", "--model.lr=0.1", "--data.normalize=true"])
    assert message.splitlines() == [
        f"error: {LAST} continues a run trained with other settings than given now; a resumed run "
        "keeps its own (drop these, or start a new run to change them):",
        "  --model.lr: 0.001 in the run, 0.1 given",
        "  --data.normalize: False in the run, True given",
    ]
    message = error_of(train_main, "--data-dir", str(image_folder), "--batch-size", "16", "--resume")
    # scripts/train.py names its own flag
    assert message.splitlines()[1:] == ["  --batch-size: 8 in the run, 16 given"]
    assert sorted(run_dir.glob("events.*")) == events

    # More epochs: allowed, and said; the run goes on in its folder, its config.yaml as it was.
    capsys.readouterr()
    cli_main([*args, "--ckpt_path=last", "--trainer.max_epochs=2"])
    assert "training extended: max_epochs 1 -> 2" in capsys.readouterr().err.splitlines()
    assert load_checkpoint(LAST)["global_step"] == 12 and os.listdir("lightning_logs") == ["version_0"]
    assert (run_dir / "config.yaml").read_bytes() == config


def test_fast_dev_run_writes_no_checkpoint(image_folder):
    cli_main(["fit", f"--data.data_dir={image_folder}", *TINY, "--trainer.fast_dev_run=true"])
    assert sorted(Path.cwd().rglob("*.ckpt")) == []
