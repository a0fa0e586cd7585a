"""Every bad input and fault: one line `error: ...`, a non-zero exit, nothing left behind or overwritten.

Each test is one row of docs/reliability.md's tables. Entry points are called in this process.
    python -m pytest tests/test_errors.py -q
"""

import errno
import os
import re
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CLASSES, run_script, write_image_folder

from lit_cifar import CIFARClassifier
from lit_cifar.cli import main as cli_main
from lit_cifar.errors import TRACEBACK_ENV, UserError, boundary
from lit_cifar.module import SCHEDULES

TINY = [
    "--trainer.accelerator=cpu",
    "--data.batch_size=8",
    "--data.val_size=12",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger.init_args.log_graph=false",
    "--dashboard.feature_maps=false",
]


def fails(capsys, fn, *args, status: int = 1) -> str:
    """The one line an entry point ends with; checks the status and that no traceback was printed."""
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    err = capsys.readouterr().err
    line = exc.value.code if isinstance(exc.value.code, str) else err.strip().splitlines()[-1]
    assert exc.value.code == status or (status == 1 and isinstance(exc.value.code, str)), exc.value.code
    assert "Traceback" not in err
    assert line.startswith("error: ") and "\n" not in line.strip()
    return line


def cli(capsys, *argv: str, status: int = 1) -> str:
    return fails(capsys, cli_main, list(argv), status=status)


def nothing_written() -> None:
    assert not Path("lightning_logs").exists() and not Path("checkpoints").exists()


def make_ckpt(path: Path, classes=CLASSES, fill: float | None = None, **hparams) -> Path:
    """A lit-cifar checkpoint as training writes it (weights, hyperparameters), without training."""
    model = CIFARClassifier(num_classes=len(classes), class_names=list(classes))
    state = model.state_dict()
    if fill is not None:
        state["net.0.weight"] = torch.full_like(state["net.0.weight"], fill)
    ckpt = {
        "state_dict": state,
        "hyper_parameters": {**dict(model.hparams), **hparams},
        "datamodule_hyper_parameters": {"dataset": "cifar10", "normalize": True},
        "pytorch-lightning_version": L.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    torch.save(ckpt, path)
    return path


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--data.val_size=1.0"], ["ambiguous", "100%", "one image", "Write 1"]),
        (["--data.val_size=2.5"], ["val_size", "whole count", "2.5"]),
        (["--data.crop_padding=40"], ["crop_padding 40", "32x32", "0 to 31"]),
        (["--data.num_workers=-1"], ["num_workers must be 0 or more", "-1"]),
        (["--data.split_seed=-1"], ["split_seed must be 0 or more"]),
        (["--model.label_smoothing=1"], ["label_smoothing must be 0 or more and below 1, got 1.0"]),
        (["--model.warmup_fraction=-0.5"], ["warmup_fraction must be 0 or more"]),
        (["--model.weight_decay=-1"], ["weight_decay must be 0 or more"]),
        (["--trainer.log_every_n_steps=0"], ["--trainer.log_every_n_steps", "above 0"]),
        (["--trainer.accumulate_grad_batches=0"], ["--trainer.accumulate_grad_batches", "above 0"]),
        (["--trainer.val_check_interval=0"], ["--trainer.val_check_interval", "above 0"]),
        (["--trainer.max_steps=-5"], ["max_steps", "-5", "--help"]),
        (["--trainer.devices=0"], ["devices", "--help"]),
        (["--trainer.precision=3"], ["trainer.precision", "'3'", "not an accepted value", "--help"]),
        (["--checkpoint.every_n_epochs=-1"], ["every_n_epochs", ">= 0"]),
        (["--dashboard.num_images=0"], ["num_images", "at least 1"]),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_a_setting_out_of_range_is_refused_before_any_work(image_folder, capsys, args, words):
    line = cli(capsys, "fit", f"--data.data_dir={image_folder}", *TINY, *args)
    assert all(w in line for w in words), line
    nothing_written()


@pytest.mark.parametrize("key", ["model:\n  lr: .nan", "trainer:\n  gradient_clip_val: .inf"])
def test_nan_or_inf_in_a_yaml_config_is_refused(image_folder, capsys, key):
    Path("c.yaml").write_text(key + "\n")
    line = cli(capsys, "fit", f"--data.data_dir={image_folder}", "--config=c.yaml", *TINY)
    assert "must be finite" in line and key.split(":")[0] in line
    nothing_written()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("model:\n  lrr: 0.1\n", ["model.lrr", "does not accept"]),
        ("model:\n  lr: abc\n", ["model.lr", "expected float", "'abc'"]),
        ("\x00garbage: [", ["Problems parsing config"]),
    ],
    ids=["unknown-key", "wrong-type", "not-yaml"],
)
def test_a_bad_yaml_config_is_one_line_and_a_pointer_to_help(image_folder, capsys, text, words):
    Path("c.yaml").write_text(text)
    line = cli(capsys, "fit", "--config=c.yaml", f"--data.data_dir={image_folder}")
    assert all(w in line for w in words) and line.endswith("see `lit-cifar fit --help`."), line
    assert "usage" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["fit", "--foo=1"], ["unrecognized arguments: --foo=1", "lit-cifar fit --help"]),
        (["fit", "--model.lr"], ["--model.lr", "expected one argument"]),
        (["fit", "--model.lr=abc"], ["model.lr", "expected float", "'abc'"]),
        (["fit", "--config=nope.yaml"], ["nope.yaml", "does not exist"]),
        (["fitt"], ["invalid choice: 'fitt'", "lit-cifar --help"]),
        ([], ["subcommand", "lit-cifar --help"]),
    ],
    ids=["unknown-flag", "no-value", "wrong-type", "missing-config", "unknown-subcommand", "no-subcommand"],
)
def test_a_bad_command_line_is_one_line_and_a_pointer_to_help(capsys, args, words):
    line = cli(capsys, *args)
    assert all(w in line for w in words), line


def test_train_script_val_size_1_0_is_ambiguous_and_1_is_one_image(image_folder, capsys):
    line = fails(capsys, run_script, "train", f"--data-dir={image_folder}", "--val-size=1.0")
    assert "ambiguous" in line
    nothing_written()


def test_a_one_class_model_is_refused():
    with pytest.raises(UserError, match="at least two classes"):
        CIFARClassifier(num_classes=1)


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
@pytest.mark.parametrize("command", ["test", "validate", "fit"])
def test_nan_or_inf_weights_are_refused_by_the_cli(image_folder, capsys, command, fill):
    ckpt = make_ckpt(Path("bad.ckpt"), fill=fill)
    line = cli(capsys, command, f"--data.data_dir={image_folder}", "--ckpt_path=bad.ckpt", *TINY)
    assert f"{ckpt} holds NaN or infinite weights (net.0.weight)" in line
    nothing_written()


@pytest.mark.parametrize("name", ["predict", "export"])
def test_nan_weights_are_refused_by_predict_and_export(image_folder, capsys, name):
    make_ckpt(Path("bad.ckpt"), fill=float("nan"))
    extra = [str(image_folder / "test")] if name == "predict" else ["--format=torchscript"]
    line = fails(capsys, run_script, name, "bad.ckpt", *extra)
    assert "bad.ckpt holds NaN or infinite weights" in line
    assert not Path("predictions.csv").exists() and not Path("bad.pt").exists()


@pytest.mark.parametrize("command", ["test", "validate"])
def test_a_checkpoint_of_other_classes_is_refused_naming_both_lists(image_folder, capsys, command):
    make_ckpt(Path("abc.ckpt"), classes=["a", "b", "c"])
    line = cli(capsys, command, f"--data.data_dir={image_folder}", "--ckpt_path=abc.ckpt", *TINY)
    assert "trained on the classes [a, b, c], but the data has [cat, dog, ship]" in line
    nothing_written()


def test_resuming_on_data_of_other_classes_is_refused(image_folder, capsys):
    make_ckpt(Path("abc.ckpt"), classes=["a", "b", "c"])
    line = fails(capsys, run_script, "train", f"--data-dir={image_folder}", "--resume=abc.ckpt")
    assert "[a, b, c]" in line and "[cat, dog, ship]" in line
    nothing_written()


@pytest.mark.parametrize(("key", "value"), [("lr", "abc"), ("net", 5), ("num_classes", "three")])
def test_a_hyperparameter_of_the_wrong_type_is_one_line(image_folder, capsys, key, value):
    make_ckpt(Path("odd.ckpt"), **{key: value})
    line = cli(capsys, "test", f"--data.data_dir={image_folder}", "--ckpt_path=odd.ckpt", *TINY)
    assert "odd.ckpt holds hyperparameters CIFARClassifier does not accept" in line and key in line
    line = fails(capsys, run_script, "predict", "odd.ckpt", str(image_folder / "test"))
    assert "odd.ckpt holds hyperparameters" in line


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p.write_bytes(b""), ["not a PyTorch checkpoint, or it is truncated"]),
        (lambda p: p.mkdir(), ["x.ckpt is a folder, not a checkpoint", "x.ckpt/last.ckpt"]),
        (lambda p: p.symlink_to(p), ["x.ckpt is a broken or looping symbolic link"]),
        (lambda p: p.symlink_to("missing-target.ckpt"), ["x.ckpt is a broken or looping symbolic link"]),
        (lambda p: None, ["no checkpoint at x.ckpt"]),
    ],
    ids=["empty-file", "a-folder", "looping-link", "broken-link", "missing"],
)
def test_a_checkpoint_path_that_is_no_file_is_one_line(image_folder, capsys, make, words):
    make(Path("x.ckpt"))
    for command in ("test", "fit"):
        line = cli(capsys, command, f"--data.data_dir={image_folder}", "--ckpt_path=x.ckpt", *TINY)
        assert all(w in line for w in words), line
    nothing_written()


# ---------------------------------------------------------------------------- files and folders


def test_default_root_dir_that_is_a_file_is_refused(image_folder, capsys):
    Path("afile").write_text("x")
    line = cli(
        capsys, "fit", f"--data.data_dir={image_folder}", "--trainer.default_root_dir=afile/runs", *TINY
    )
    assert "afile is a file, not a folder" in line and "--trainer.default_root_dir" in line


def test_a_read_only_default_root_dir_is_refused(image_folder, capsys, monkeypatch):
    Path("ro").mkdir()
    real = os.access  # this test machine runs as root, who may write anywhere: pretend not
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p).name == "ro" else real(p, m))
    line = cli(capsys, "fit", f"--data.data_dir={image_folder}", "--trainer.default_root_dir=ro", *TINY)
    assert "ro is read-only for this user" in line and "--trainer.default_root_dir" in line
    assert list(Path("ro").iterdir()) == []


def test_an_os_error_becomes_one_line_naming_the_file_and_the_fix(capsys):
    def full_disk():
        with boundary():
            raise OSError(errno.ENOSPC, "No space left on device", "ck/last.ckpt")

    line = fails(capsys, full_disk)
    assert (
        line
        == "error: No space left on device: ck/last.ckpt: the disk is full: free some space, or write elsewhere."
    )


def test_a_failed_test_command_leaves_no_run_folder(tmp_path, capsys):
    data = write_image_folder(tmp_path / "notest", test_per_class=0)
    make_ckpt(Path("m.ckpt"))
    line = cli(capsys, "test", f"--data.data_dir={data}", "--ckpt_path=m.ckpt", *TINY)
    assert "has no test/ folder" in line
    nothing_written()


def test_a_second_run_into_the_same_checkpoint_folder_is_refused_and_resume_continues_it(
    image_folder, capsys
):
    cli_main(["fit", f"--data.data_dir={image_folder}", "--checkpoint.dirpath=ck", *TINY])
    first = Path("ck/last.ckpt").read_bytes()
    line = cli(capsys, "fit", f"--data.data_dir={image_folder}", "--checkpoint.dirpath=ck", *TINY)
    assert "ck holds another run's checkpoints" in line and "--ckpt_path last" in line
    assert Path("ck/last.ckpt").read_bytes() == first
    assert sorted(Path("lightning_logs").iterdir()) == [
        Path("lightning_logs/version_0")
    ]  # none for the refused run
    cli_main(["fit", f"--data.data_dir={image_folder}", "--checkpoint.dirpath=ck", "--ckpt_path=last",
              *TINY, "--trainer.max_epochs=2"])  # fmt: skip
    assert torch.load("ck/last.ckpt", weights_only=True)["global_step"] == 4  # 2 epochs of 2 steps


def test_a_run_into_another_runs_log_folder_is_refused(image_folder, capsys):
    run = ["fit", f"--data.data_dir={image_folder}", "--trainer.logger.init_args.version=mine", *TINY]
    cli_main(run)
    line = cli(capsys, *run)
    assert "holds another run's checkpoints" in line or "holds another run's logs" in line


def test_predict_output_an_existing_folder_is_refused(image_folder, capsys):
    make_ckpt(Path("m.ckpt"))
    Path("out").mkdir()
    line = fails(capsys, run_script, "predict", "m.ckpt", str(image_folder / "test"), "--output=out")
    assert "out is a folder, not a file" in line


def test_predict_never_overwrites_a_file_it_did_not_write_but_replaces_its_own(image_folder, capsys):
    make_ckpt(Path("m.ckpt"))
    Path("mine.csv").write_text("my,own,data\n")
    line = fails(capsys, run_script, "predict", "m.ckpt", str(image_folder / "test"), "--output=mine.csv")
    assert "mine.csv exists and was not written by this command" in line
    assert Path("mine.csv").read_text() == "my,own,data\n"
    run_script("predict", "m.ckpt", str(image_folder / "test"), "--output=p.csv")
    run_script("predict", "m.ckpt", str(image_folder / "test"), "--output=p.csv")  # a re-run replaces it
    assert len(Path("p.csv").read_text().splitlines()) == 1 + 12


def test_export_never_overwrites_a_file_it_did_not_write(capsys):
    make_ckpt(Path("m.ckpt"))
    Path("m.pt").write_text("not an export")
    line = fails(capsys, run_script, "export", "m.ckpt", "--format=torchscript")
    assert "m.pt exists and was not written by this command" in line
    assert Path("m.pt").read_text() == "not an export"


def test_predict_script_on_a_gpu_that_is_not_there(image_folder, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    make_ckpt(Path("m.ckpt"))
    line = fails(capsys, run_script, "predict", "m.ckpt", str(image_folder / "test"), "--accelerator=gpu")
    assert "no usable GPU" in line and "use --accelerator cpu" in line


# ---------------------------------------------------------------------------- signals, bugs


class _Signal(L.Callback):
    def __init__(self, when: str, sig: int) -> None:
        self.when, self.sig = when, sig

    def on_train_batch_start(self, trainer, *args) -> None:
        if self.when == "start":
            os.kill(os.getpid(), self.sig)

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.when == "end":
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 1)])
def test_a_signal_during_a_run_is_one_line_and_a_run_that_did_no_step_leaves_nothing(
    image_folder, capsys, sig, status
):
    cb = f"--trainer.callbacks+={__name__}._Signal"
    when = "start" if sig == signal.SIGINT else "end"
    line = cli(capsys, "fit", f"--data.data_dir={image_folder}", *TINY, cb, f"--trainer.callbacks.when={when}",
               f"--trainer.callbacks.sig={int(sig)}", status=status)  # fmt: skip
    assert f"stopped by {sig.name} before the run finished" in line and "--ckpt_path last" in line
    if sig == signal.SIGINT:
        nothing_written()  # interrupted before its first step: its empty run folder is removed
    else:
        assert Path("lightning_logs/version_0").is_dir()  # one step trained: its logs are kept


def test_a_bug_keeps_its_traceback_and_the_variable_shows_it_for_all(monkeypatch):
    with pytest.raises(ZeroDivisionError), boundary():
        1 / 0  # noqa: B018
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(UserError), boundary():
        raise UserError("a user error, shown with its traceback")


def test_divergence_advice_names_only_settings_that_exist(image_folder, capsys):
    line = cli(capsys, "fit", f"--data.data_dir={image_folder}", *TINY, "--model.lr=1e6",
               "--model.schedule=constant", "--trainer.log_every_n_steps=1", "--trainer.limit_train_batches=6",
               "--trainer.max_epochs=3")  # fmt: skip
    assert "training diverged" in line
    advised = re.findall(r"--model\.(\w+)(?: (\w+))?", line)
    assert advised and all(k in CIFARClassifier.__init__.__code__.co_varnames for k, _ in advised)
    assert all(v in SCHEDULES for k, v in advised if k == "schedule") and "schedule onecycle" in line
