"""The core: network, module, data module, both entry points, checkpoints, the split, and what a
newcomer meets first (the summary line, quiet runs, the flags named in messages, the README's commands).
The tour script is tested with the dashboard (test_tensorboard.py)."""

import ast
import importlib.util
import math
import re
import shlex
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, checksum_config, error_of, events, load_script, quiet_trainer, run

from lit_cifar import CIFARClassifier, CIFARDataModule, build_net
from lit_cifar.cli import main as cli_main
from lit_cifar.loaders import split_indices

# The line both `scripts/train.py` and `lit-cifar fit` end with.
SUMMARY = re.compile(r"(test|val)/acc (\S+) \| best checkpoint: (.+) \| logs: (.+)")
# What a newcomer reads as an error: a Python warning's "file.py:123: ", tracebacks, adverts.
LOOKS_LIKE_AN_ERROR = re.compile(r"\.py:\d+: |warn|deprecat|traceback|error|tip:", re.IGNORECASE)


def summary_accuracy(stdout: str, metric: str) -> float:
    """The accuracy on the summary line (the last line), which must be a number in [0, 1]."""
    match = SUMMARY.fullmatch(stdout.strip().splitlines()[-1])
    assert match and match[1] == metric.split("/")[0], stdout[-1000:]
    value = float(match[2])
    assert math.isfinite(value) and 0 <= value <= 1, match[0]
    return value


def no_error_lines(stderr: str) -> None:
    assert not [line for line in stderr.splitlines() if LOOKS_LIKE_AN_ERROR.search(line)], stderr


def data_of(source: str, request) -> tuple[str, list[str]]:
    """Fixture `source`'s data folder, and for the tests' own pickles a config with their md5s."""
    data = request.getfixturevalue(source)
    return (str(data[0]), [checksum_config(data[1])]) if source == "batches" else (str(data), [])


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


@pytest.mark.slow  # a real process: ~15 s of start-up
@pytest.mark.parametrize("source", ["image_folder", "batches"])
def test_train_script_fast_dev_run_checks_and_writes_nothing(source, request):
    data_dir, config = data_of(source, request)
    train = [sys.executable, str(REPO / "scripts/train.py"), "--accelerator", "cpu", "--data-dir", data_dir]
    proc = run(*train, "--fast-dev-run", "2", *config)
    summary_accuracy(proc.stdout, "test/acc")
    assert proc.stdout.strip().endswith("| best checkpoint: (none saved) | logs: (none written)")
    no_error_lines(proc.stderr)
    assert not Path("checkpoints").exists() and not Path("lightning_logs").exists()  # a check writes nothing


@pytest.mark.slow  # a real process: ~15 s of start-up
@pytest.mark.parametrize("source", ["image_folder", "batches"])
def test_cli_fast_dev_run_from_its_own_printed_config(source, request, capsys):
    data_dir, config = data_of(source, request)
    with pytest.raises(SystemExit):  # the defaults, printed: a config that round-trips
        cli_main(["fit", "--print_config"])
    Path("printed.yaml").write_text(capsys.readouterr().out)
    fit = ["lit-cifar", "fit", "--config=printed.yaml", *config, "--trainer.accelerator=cpu"]
    proc = run(*fit, f"--data.data_dir={data_dir}", "--trainer.fast_dev_run=2")
    summary_accuracy(proc.stdout, "val/acc")  # the same line as scripts/train.py's


@pytest.mark.slow  # a real process: ~15 s of start-up
def test_train_script_one_epoch_writes_logs_and_checkpoint_and_prints_nothing_like_an_error(image_folder):
    train = [sys.executable, str(REPO / "scripts/train.py"), "--accelerator", "cpu", "--max-epochs", "1"]
    # the tiny set has one batch: --trainer.log_every_n_steps 1, no "fewer batches than" advice
    proc = run(*train, "--data-dir", str(image_folder), "--trainer.log_every_n_steps", "1")
    # no args-and-argv warning, no Tip adverts, no torch.jit notices from the graph, no warnings
    no_error_lines(proc.stderr)
    accuracy = summary_accuracy(proc.stdout, "test/acc")
    assert "best checkpoint: ./lightning_logs/version_0/checkpoints/epoch00" in proc.stdout
    log_dir = Path("lightning_logs/version_0")
    scalars = events(log_dir)["scalars"]
    losses = [v for tag, points in scalars.items() if tag.startswith("train/loss") for _, v in points]
    assert losses and all(math.isfinite(v) for v in losses), scalars
    [(_, val_acc)], [(_, test_acc)] = scalars["val/acc"], scalars["test/acc"]  # one epoch, one test
    assert 0 <= val_acc <= 1 and test_acc == pytest.approx(accuracy, abs=1e-4)  # the summary's value
    assert (log_dir / "config.yaml").exists()
    assert (log_dir / "checkpoints/last.ckpt").exists()


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


def test_train_help_imports_neither_torch_nor_lightning_and_shows_the_classes_defaults():
    code = (
        "import runpy, sys; sys.argv = ['train.py', '--help']\n"
        f"try: runpy.run_path({str(REPO / 'scripts/train.py')!r}, run_name='__main__')\n"
        "except SystemExit: pass\n"
        "print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    )
    out = run(sys.executable, "-c", code).stdout
    assert out.strip().endswith("[]"), out[-300:]
    help = " ".join(out.split())
    # read from CIFARDataModule, lit_cifar/cli.py's TRAINER_DEFAULTS and Lightning's Trainer
    assert "--data-dir DATA_DIR data.data_dir (default: data)" in help
    assert "trainer.max_epochs (default: 20)" in help and "trainer.accelerator (default: auto)" in help
    assert "--limit-batches N" in help and "trainer.max_steps (default: -1)" in help


def test_train_messages_suggest_flags_train_py_accepts(image_folder, tmp_path):
    """Without --data-dir the data is looked for (and downloaded) in ./data, inside the working
    folder; and each flag a message suggests is one scripts/train.py takes."""
    train = load_script("train")
    messages = [
        error_of(train.main, train.parse_args(["--accelerator", "cpu", "--data.download", "false"])),
        error_of(train.main, train.parse_args(["--data-dir", str(image_folder), "--resume"])),
    ]
    assert f"data_dir {tmp_path / 'data'} " in messages[0], messages[0]
    assert "--resume" in messages[1] and "--default-root-dir" in messages[1]
    if not torch.cuda.is_available():
        message = error_of(train.main, train.parse_args(["--accelerator", "gpu"]))
        assert "use --accelerator cpu" in message
        messages.append(message)
    for message in messages:
        assert "--trainer." not in message and "--ckpt_path" not in message, message
        for flag, value in re.findall(r"(--[\w.-]*\w)(?: (\w+))?", message):
            train.parse_args([flag, value or "1"])  # an unknown flag would exit


def test_train_short_trial_flags(image_folder):
    train = load_script("train")
    flags = [
        "--accelerator",
        "cpu",
        "--data-dir",
        str(image_folder),
        "--batch-size",
        "8",
        "--max-epochs",
        "3",
    ]
    train.main(train.parse_args([*flags, "--limit-batches", "2", "--max-steps", "5"]))
    ckpt = torch.load("lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    # 54 training images are 7 batches of 8. With the limit, epochs 0 and 1 take 2 steps each and
    # max_steps stops epoch 2 after its first (the checkpoint counts it as done): without, 5 steps of epoch 0.
    assert (ckpt["global_step"], ckpt["epoch"]) == (5, 3)


def test_from_seed_cites_names_that_exist():
    """docs/from_seed.md's `path.py:Name.attr`: ours in the repository, Lightning's in its package."""
    lightning = Path(importlib.util.find_spec("lightning").submodule_search_locations[0]) / "pytorch"
    cited = re.findall(r"`([\w/]+\.py):([\w.]+)`", (REPO / "docs/from_seed.md").read_text())
    assert len(cited) >= 20
    for path, name in cited:
        nodes = ast.parse((REPO / path if (REPO / path).exists() else lightning / path).read_text()).body
        for part in name.split("."):
            node = next((n for n in nodes if part in _names_defined(n)), None)
            assert node is not None, f"docs/from_seed.md cites {path}:{name}, which does not exist"
            nodes = getattr(node, "body", [])


def _names_defined(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    return {t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)}


def test_readme_quick_start_is_what_ci_runs_and_its_train_commands_parse():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.splitlines()]
    ci = (REPO / ".ci/run").read_text().splitlines()
    install = next(c for c in commands if c.startswith("pip install"))
    assert f"python -m {install}" in ci and "python -m pytest" in commands and "python -m pytest" in ci
    # the CPU-only install asks for the torch versions pyproject.toml allows
    cpu_install = re.search(r'pip install "torch(<=[\d.]+)" "torchvision(<=[\d.]+)" --index-url', readme)
    pyproject = (REPO / "pyproject.toml").read_text()
    for name, bound in zip(("torch", "torchvision"), cpu_install.groups(), strict=True):
        assert re.search(rf'"{name}>=[\d.]+,{re.escape(bound)}"', pyproject), (name, bound)
    train = load_script("train")
    examples = re.findall(r"^python scripts/train\.py([^#`\n]*)", readme, re.MULTILINE)
    assert len(examples) >= 5
    for flags in examples:
        train.parse_args(shlex.split(flags))  # an unknown flag exits
