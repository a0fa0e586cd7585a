"""Hyperparameter search with Optuna: each trial a normal `lit-cifar fit` run, pruned on val/acc.

    python scripts/sweep.py --data-dir ../shared/cifar10-jpeg --net seed_bn --trials 40 --max-epochs 20
    python scripts/sweep.py ... --jobs 8 --trainer.accelerator gpu   # 8 trials at once on a GPU

Arguments it does not know (or all after `--`) pass through to every trial's `lit-cifar fit`.
--output-dir gets study.db (the default storage; running the command again continues the study),
tb/trial_N/ (each trial's TensorBoard run, config.yaml and checkpoints), trials.md (the table) and
best.yaml, which `lit-cifar fit --config best.yaml` trains again. Needs: pip install -e ".[sweep]".
"""

import argparse
import multiprocessing
import os
import sys
import warnings
from pathlib import Path

import yaml

from lit_cifar.cli import LitCifarCLI
from lit_cifar.errors import UserError

try:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna_integration import PyTorchLightningPruningCallback
except ImportError as err:
    sys.exit(f'error: the sweep needs Optuna ({err.name} is not installed): pip install -e ".[sweep]"')
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the two noted below


# The search space: lit-cifar settings (LightningCLI keys) -> how a trial picks each one's value.
# The schedule stays the default one-cycle (pass `--model.schedule constant` through to search without it).
SPACE = {
    "model.lr": lambda trial, key: trial.suggest_float(key, 5e-4, 2e-2, log=True),
    "model.weight_decay": lambda trial, key: trial.suggest_float(key, 1e-4, 0.3, log=True),
    "model.label_smoothing": lambda trial, key: trial.suggest_float(key, 0.0, 0.2),
    "model.warmup_fraction": lambda trial, key: trial.suggest_float(key, 0.05, 0.4),
    "model.flip_tta": lambda trial, key: trial.suggest_categorical(key, [False, True]),
    "data.batch_size": lambda trial, key: trial.suggest_categorical(key, [64, 128, 256]),
    "data.crop_padding": lambda trial, key: trial.suggest_int(key, 0, 6, step=2),
    "data.padding_mode": lambda trial, key: trial.suggest_categorical(key, ["constant", "reflect"]),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--data-dir", help="data.data_dir of every trial")
    parser.add_argument("--net", help="model.net of every trial (the study's network)")
    parser.add_argument("--max-epochs", type=int, help="trainer.max_epochs of every trial")
    parser.add_argument("--trials", type=int, help="trials to run in this call (default: until --timeout)")
    parser.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    parser.add_argument("--jobs", type=int, default=1, help="trials at once, each in its own process")
    parser.add_argument("--output-dir", type=Path, default=Path("sweep"), help="default: %(default)s")
    parser.add_argument("--storage", help="Optuna RDB URL or journal file (default: OUTPUT_DIR/study.db)")
    parser.add_argument("--study-name", default="lit-cifar", help="default: %(default)s")
    parser.error = lambda message: sys.exit(
        f"error: {message} (see {sys.argv[0]} --help)"
    )  # one line, no usage
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    args, passthrough = get_args_parser().parse_known_args(argv)
    passthrough = [a for a in passthrough if a != "--"]
    searched = {a.removeprefix("--").split("=")[0] for a in passthrough} & set(SPACE)
    if searched:  # the searched value would replace it
        raise UserError(f"--{searched.pop()} is searched by the sweep: drop it, or edit SPACE in {__file__}.")
    if args.trials is None and args.timeout is None:
        raise UserError("no budget: give --trials N and/or --timeout SECONDS.")
    if min(args.jobs, args.trials or 1) < 1:
        raise UserError("--trials and --jobs must be at least 1.")
    return args, passthrough


def fit_args(args: argparse.Namespace, passthrough: list[str]) -> list[str]:
    """What every trial gives the CLI: quiet output, then the passed-through settings, then the flags."""
    flags = {"data.data_dir": args.data_dir, "model.net": args.net, "trainer.max_epochs": args.max_epochs}
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    return quiet + passthrough + [f"--{k}={v}" for k, v in flags.items() if v is not None]


def build_cli(cli_args: list[str]) -> LitCifarCLI:
    # Lightning warns when sys.argv holds arguments too: here they are the sweep's, read already.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return LitCifarCLI(args=cli_args, run=False)  # a bad passed-through setting: one UserError line


def objective(trial: "optuna.Trial", args: argparse.Namespace, passthrough: list[str]) -> float:
    run_dir = args.output_dir / "tb" / f"trial_{trial.number}"
    if run_dir.exists():
        raise UserError(f"{run_dir} exists (another study's trial?): give this study its own --output-dir.")
    logger = {"save_dir": args.output_dir, "name": "tb", "version": run_dir.name}
    logger_args = [f"--trainer.logger.init_args.{k}={v}" for k, v in logger.items()]
    settings = [f"--{key}={pick(trial, key)}" for key, pick in SPACE.items()]
    cli = build_cli(fit_args(args, passthrough) + logger_args + settings)
    cli.trainer.callbacks.append(PyTorchLightningPruningCallback(trial, monitor="val/acc"))
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except SystemExit as err:  # Lightning turns Ctrl-C (and SIGTERM) into an exit: Optuna marks
        raise KeyboardInterrupt from err  # a trial failed on KeyboardInterrupt, not on SystemExit
    return cli.trainer.callback_metrics["val/acc_best"].item()


def optimize(args, passthrough, n_trials: int | None, pruner: "optuna.pruners.BasePruner") -> bool:
    """Run trials of the study in this process; True if Ctrl-C stopped it (its trial marked FAIL)."""
    # constant_liar: trials running in other processes count as bad until they finish, so that
    # parallel workers do not all sample the same promising corner (experimental in Optuna).
    sampler = optuna.samplers.TPESampler(constant_liar=True)
    study = optuna.load_study(
        study_name=args.study_name, storage=storage(args), sampler=sampler, pruner=pruner
    )
    try:
        study.optimize(lambda t: objective(t, args, passthrough), n_trials=n_trials, timeout=args.timeout)
    except KeyboardInterrupt:
        return True
    except UserError as err:
        sys.exit(f"error: {err}")
    return False


def storage(args: argparse.Namespace) -> "str | optuna.storages.BaseStorage":
    url = args.storage or f"sqlite:///{args.output_dir / 'study.db'}"
    if "://" not in url:
        return JournalStorage(JournalFileBackend(url))
    # A heartbeat (experimental): a trial starting 2 min after a process was killed marks its trial FAIL.
    return optuna.storages.RDBStorage(url, heartbeat_interval=60)


def report(study: "optuna.Study", args: argparse.Namespace) -> str:
    """The table of trials (markdown), and best.yaml: the best trial's config, logged where you run it."""
    keys = sorted({k for t in study.trials for k in t.params})
    lines = [
        f"study {study.study_name}: {len(study.trials)} trials; val/acc: each trial's best, at epoch (1-based)",
        _row(["trial", "state", "val/acc", "epoch", "s"] + [k.split(".")[1] for k in keys]),
        "|---" * (5 + len(keys)) + "|",
    ]
    for t in study.trials:
        acc = t.intermediate_values  # epoch -> val/acc
        epoch = max(acc, key=acc.get) if acc else None
        best = [f"{acc[epoch]:.4f}", epoch + 1] if acc else ["", ""]
        secs = f"{t.duration.total_seconds():.0f}" if t.duration else ""
        values = [f"{v:.3g}" if isinstance(v, float) else v for v in (t.params.get(k, "") for k in keys)]
        lines.append(_row([t.number, t.state.name, *best, secs, *values]))
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))  # not a pruned trial's partial value
    if done:
        best = max(done, key=lambda t: t.value)
        title = f"sweep {study.study_name}, trial {best.number}: val/acc {best.value:.4f}"
        lines.append(f"best: {title}: {write_best(args.output_dir, best.number, title)}")
    _write(args.output_dir / "trials.md", "\n".join(lines) + "\n")
    return "\n".join(lines)


def write_best(output_dir: Path, number: int, title: str) -> str:
    """best.yaml: the trial's config less the sweep's own logger and quiet output (a rerun logs to
    lightning_logs/, never into the sweep, with its progress bar)."""
    config_file = output_dir / "tb" / f"trial_{number}" / "config.yaml"
    if not config_file.exists():  # the trial ran on another machine, into its own --output-dir
        return f"no {config_file} here, best.yaml not written"
    config = yaml.safe_load(config_file.read_text())
    for key in ("logger", "enable_progress_bar", "enable_model_summary"):
        config["trainer"].pop(key)
    _write(output_dir / "best.yaml", f"# {title}\n{yaml.dump(config)}")
    return str(output_dir / "best.yaml")


def _row(cells: list) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")  # renamed into place: a reader never sees half a file
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None, pruner: "optuna.pruners.BasePruner | None" = None) -> None:
    try:
        args, passthrough = parse(sys.argv[1:] if argv is None else argv)
        cli = build_cli(fit_args(args, passthrough))  # bad settings fail here, before any trial
        cli.datamodule.prepare_data()  # decode the data once, not once per --jobs process
        epochs = cli.trainer.max_epochs
    except UserError as err:
        sys.exit(f"error: {err}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    # No pruning in the first quarter of a run: the one-cycle warm-up makes early epochs unequal.
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 4))
    optuna.create_study(
        study_name=args.study_name, storage=storage(args), direction="maximize", load_if_exists=True
    )
    jobs = min(args.jobs, args.trials or args.jobs)
    shares = [None if args.trials is None else len(range(i, args.trials, jobs)) for i in range(jobs)]
    interrupted, workers = False, []
    try:
        if jobs == 1:
            interrupted = optimize(args, passthrough, shares[0], pruner)
        else:  # processes, not optuna's n_jobs threads: Lightning and torch's seeding are per process
            spawn = multiprocessing.get_context("spawn")
            workers = [spawn.Process(target=optimize, args=(args, passthrough, n, pruner)) for n in shares]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
    except KeyboardInterrupt:
        interrupted = True
        for w in workers:
            w.join()  # each marks its running trial FAIL and stops
    print(report(optuna.load_study(study_name=args.study_name, storage=storage(args)), args))
    if interrupted:
        sys.exit("error: interrupted: the running trials are marked FAIL; run the same command to continue.")


if __name__ == "__main__":
    main()
