"""scripts/sweep.py: an Optuna study of lit-cifar runs, continued, pruned, interrupted, reproduced."""

import signal
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import load_script, write_image_folder

from lit_cifar.cli import LitCifarCLI
from lit_cifar.cli import main as cli_main

QUIET_DASHBOARD = ("inputs", "feature_maps", "confusion_matrix", "misclassified")  # the HParams tab stays


def sweep_args(data: Path, out: Path, trials: int) -> list[str]:
    """Short trials on tiny data: 2 epochs of at most 2 batches, no pictures; the --trainer/--data/--dashboard settings go through to lit-cifar."""
    flags = ["--data-dir", str(data), "--max-epochs", "2", "--trials", str(trials), "--output-dir", str(out)]
    quick = ["--trainer.logger.init_args.log_graph=false"] + [
        f"--dashboard.{k}=false" for k in QUIET_DASHBOARD
    ]
    return flags + ["--trainer.limit_train_batches=2", "--data.val_size=6", *quick]


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="lit-cifar", storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.slow
def test_study_continues_and_best_yaml_reproduces_the_best_trial(tmp_path, capsys):
    data, out = write_image_folder(tmp_path / "images", per_class=10), tmp_path / "sweep"
    sweep = load_script("sweep")
    sweep.main(sweep_args(data, out, trials=3))
    assert [t.state.name for t in load(out).trials] == ["COMPLETE"] * 3

    sweep.main(sweep_args(data, out, trials=1))  # the same command again: one more trial, same study
    assert optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}") == ["lit-cifar"]
    study = load(out)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert sorted(p.name for p in (out / "tb").iterdir()) == ["trial_0", "trial_1", "trial_2", "trial_3"]
    for t in study.trials:  # each trial: its own TensorBoard run and config, its value the best epoch's
        assert (out / "tb" / f"trial_{t.number}" / "config.yaml").exists()
        assert list((out / "tb" / f"trial_{t.number}").glob("events.out.tfevents.*"))
        assert 0 <= t.value == max(t.intermediate_values.values()) <= 1
        assert sorted(t.intermediate_values) == [0, 1]  # val/acc reported after each of the 2 epochs
    rows = [
        line
        for line in (out / "trials.md").read_text().splitlines()
        if line.startswith("| ") and "COMPLETE" in line
    ]
    assert len(rows) == 4

    best = study.best_trial
    text = (out / "best.yaml").read_text()
    assert text.startswith(f"# sweep lit-cifar, trial {best.number}: val/acc {best.value:.4f}")
    trainer = yaml.safe_load(text)["trainer"]  # the sweep's logger and quiet output are not the recipe
    assert not {"logger", "enable_progress_bar", "enable_model_summary"} & set(trainer)
    cli = LitCifarCLI(
        args=["--config", str(out / "best.yaml"), "--trainer.enable_progress_bar=false"], run=False
    )
    for key, value in best.params.items():  # every searched setting, as the best trial had it
        section, name = key.split(".")
        owner = cli.model if section == "model" else cli.datamodule
        assert owner.hparams[name] == pytest.approx(value), key
    assert cli.trainer.max_epochs == 2 and cli.trainer.limit_train_batches == 2
    assert Path(cli.trainer.log_dir).parent.name == "lightning_logs"  # a rerun never writes into the sweep
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)  # the same seed and settings: the same accuracy
    assert cli.trainer.callback_metrics["val/acc_best"].item() == pytest.approx(best.value)

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # and the `lit-cifar fit` command takes it as it is
        cli_main(["fit", "--config", str(out / "best.yaml"), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in best.params.items():
        section, name = key.split(".")
        assert printed[section][name] == pytest.approx(value), key


def test_a_pruned_trial_is_recorded_as_pruned(tmp_path):
    data, out = write_image_folder(tmp_path / "images", per_class=4), tmp_path / "sweep"
    # val/acc can never reach 1.01: the trial is pruned at its first epoch's report
    load_script("sweep").main(
        sweep_args(data, out, trials=1), pruner=optuna.pruners.ThresholdPruner(lower=1.01)
    )
    (trial,) = load(out).trials
    assert trial.state.name == "PRUNED"
    assert list(trial.intermediate_values) == [0]  # it stopped after epoch 0 of 2
    assert "| 0 | PRUNED |" in (out / "trials.md").read_text()
    assert not (out / "best.yaml").exists()  # no finished trial, no best


class Interrupt(optuna.pruners.BasePruner):
    """Ctrl-C as the first epoch's val/acc is reported: inside Lightning's fit, as a real one lands."""

    def prune(self, study, trial) -> bool:
        raise KeyboardInterrupt


def test_an_interrupted_trial_is_marked_failed_and_the_table_written(tmp_path):
    data, out = write_image_folder(tmp_path / "images", per_class=4), tmp_path / "sweep"
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit, match="^error: interrupted: .*run the same command to continue"):
            load_script("sweep").main(sweep_args(data, out, trials=3), pruner=Interrupt())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-Cs after the first
    assert [t.state.name for t in load(out).trials] == ["FAIL"]  # not left RUNNING; no trial after it
    assert "| 0 | FAIL |" in (out / "trials.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.lr", "1e-3"], "error: --model.lr is searched by the sweep: drop it"),
        (["--model.lrr=1"], "error: .*--model.lrr=1.*: see `lit-cifar fit --help`"),
        (["--net", "resnet"], "error: unknown network 'resnet'"),
        (["--jobs", "0"], "error: --trials and --jobs must be at least 1"),
        (["--jobs", "two"], "error: argument --jobs: invalid int value: 'two'"),
    ],
)
def test_bad_settings_fail_in_one_line_before_any_trial(tmp_path, extra, message):
    data, out = write_image_folder(tmp_path / "images", per_class=2, test_per_class=0), tmp_path / "sweep"
    with pytest.raises(SystemExit, match=message) as exit_info:
        load_script("sweep").main(sweep_args(data, out, trials=1) + extra)
    assert "\n" not in str(exit_info.value.code)
    assert not out.exists()  # nothing written


def test_without_optuna_one_line_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the sweep extra were not installed
    with pytest.raises(SystemExit, match=r'^error: the sweep needs Optuna .*: pip install -e "\.\[sweep\]"$'):
        load_script("sweep")
