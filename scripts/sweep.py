"""Hyperparameter search with Optuna: each trial a normal `lit-cifar fit` run, pruned on val/acc.

    python scripts/sweep.py --data-dir ../shared/cifar10-jpeg --net seed_bn --trials 40 --max-epochs 20
    python scripts/sweep.py ... --jobs 8 --trainer.accelerator gpu   # 8 trials at once on a GPU

Arguments it does not know (or all after `--`) pass through to every trial's `lit-cifar fit`. What it
writes, how it prunes and continues: docs/sweeps/README.md. Needs: pip install -e ".[sweep]".
"""

import argparse
import multiprocessing
import sys
import warnings
from pathlib import Path

import yaml

from lit_cifar.cli import LitCifarCLI
from lit_cifar.errors import ArgumentParser, UserError, boundary

try:
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna_integration import PyTorchLightningPruningCallback
except ImportError as err:
    sys.exit(f'error: the sweep needs Optuna ({err.name} is not installed): pip install -e ".[sweep]"')
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the two noted below
# Lightning warns when sys.argv holds arguments too: here they are the sweep's, read already.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")

# The search space: lit-cifar settings (LightningCLI keys) -> how a trial picks each one's value.
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


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's flags, and the rest: the settings passed through to every trial."""
    parser = ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--data-dir", help="data.data_dir of every trial")
    parser.add_argument("--net", help="model.net of every trial (the study's network)")
    parser.add_argument("--max-epochs", type=int, help="trainer.max_epochs of every trial")
    parser.add_argument("--trials", type=int, help="trials to run in this call (default: until --timeout)")
    parser.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    parser.add_argument("--jobs", type=int, default=1, help="trials at once, each in its own process")
    parser.add_argument("--output-dir", type=Path, default=Path("sweep"), help="default: %(default)s")
    parser.add_argument("--storage", help="Optuna RDB URL or journal file (default: OUTPUT_DIR/study.db)")
    parser.add_argument("--study-name", default="lit-cifar", help="default: %(default)s")
    args, passthrough = parser.parse_known_args(argv)
    passthrough = [a for a in passthrough if a != "--"]
    if searched := {a.removeprefix("--").split("=")[0] for a in passthrough} & set(SPACE):
        raise UserError(f"--{searched.pop()} is searched by the sweep: drop it, or edit SPACE in {__file__}.")
    if args.trials is None and args.timeout is None:
        raise UserError("no budget: give --trials N and/or --timeout SECONDS.")
    if min(args.jobs, args.trials or 1) < 1:
        raise UserError("--trials and --jobs must be at least 1.")
    return args, passthrough


def build_cli(args: argparse.Namespace, passthrough: list[str], *trial_args: str) -> LitCifarCLI:
    """`lit-cifar fit` of a trial: quiet, the passed-through settings, the sweep's flags, the trial's own."""
    flags = {"data.data_dir": args.data_dir, "model.net": args.net, "trainer.max_epochs": args.max_epochs}
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    given = [f"--{k}={v}" for k, v in flags.items() if v is not None]
    return LitCifarCLI(args=[*quiet, *passthrough, *given, *trial_args], run=False)  # bad: a UserError


def load_study(args: argparse.Namespace, **kwargs) -> "optuna.Study":
    """The study, made on first use, in --storage: an RDB URL, or else the path of a journal file."""
    url = args.storage or f"sqlite:///{args.output_dir / 'study.db'}"
    # A heartbeat (experimental): a trial starting 2 min after a process was killed marks its trial FAIL.
    storage = (
        RDBStorage(url, heartbeat_interval=60) if "://" in url else JournalStorage(JournalFileBackend(url))
    )
    return optuna.create_study(
        study_name=args.study_name, storage=storage, direction="maximize", load_if_exists=True, **kwargs
    )


def optimize(args, passthrough, n_trials: int | None, pruner: "optuna.pruners.BasePruner") -> bool:
    """Run trials of the study in this process; True if Ctrl-C stopped it (its trial marked FAIL)."""

    def objective(trial: optuna.Trial) -> float:
        run = args.output_dir / "tb" / f"trial_{trial.number}"
        if run.exists():
            raise UserError(f"{run} exists (another study's trial?): give this study its own --output-dir.")
        logger = {"save_dir": args.output_dir, "name": "tb", "version": run.name}
        settings = [f"--trainer.logger.init_args.{k}={v}" for k, v in logger.items()]
        settings += [f"--{key}={pick(trial, key)}" for key, pick in SPACE.items()]
        cli = build_cli(args, passthrough, *settings)
        cli.trainer.callbacks.append(PyTorchLightningPruningCallback(trial, monitor="val/acc"))
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        except SystemExit as err:  # Lightning turns Ctrl-C (and SIGTERM) into an exit: Optuna marks
            raise KeyboardInterrupt from err  # a trial failed on KeyboardInterrupt, not on SystemExit
        return cli.trainer.callback_metrics["val/acc_best"].item()

    # constant_liar: trials running in other processes count as bad until they finish, so that
    # parallel workers do not all sample the same promising corner (experimental in Optuna).
    study = load_study(args, sampler=optuna.samplers.TPESampler(constant_liar=True), pruner=pruner)
    with boundary():
        try:
            study.optimize(objective, n_trials=n_trials, timeout=args.timeout)
        except KeyboardInterrupt:
            return True
    return False


def report(study: "optuna.Study", output_dir: Path) -> str:
    """trials.md, the table of trials; best.yaml, the best finished trial's config.yaml less the sweep's
    logger and quiet output (a rerun logs to lightning_logs/, never into the sweep)."""
    keys = sorted({k for t in study.trials for k in t.params})
    head = ["trial", "state", "val/acc", "epoch", "s"] + [k.split(".")[1] for k in keys]
    rows = [head, ["---"] * len(head)]
    for t in study.trials:
        acc = t.intermediate_values  # epoch -> val/acc
        epoch = max(acc, key=acc.get, default=None)
        best = [f"{acc[epoch]:.4f}", epoch + 1] if acc else ["", ""]
        secs = f"{t.duration.total_seconds():.0f}" if t.duration else ""
        values = [f"{v:.3g}" if isinstance(v, float) else v for v in (t.params.get(k, "") for k in keys)]
        rows.append([t.number, t.state.name, *best, secs, *values])
    lines = [
        f"study {study.study_name}: {len(rows) - 2} trials; val/acc: each trial's best, at epoch (1-based)"
    ]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    if done := study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):  # not a pruned trial's value
        best = max(done, key=lambda t: t.value)
        title = f"sweep {study.study_name}, trial {best.number}: val/acc {best.value:.4f}"
        config_file = output_dir / "tb" / f"trial_{best.number}" / "config.yaml"
        where = f"no {config_file} here, best.yaml not written"  # it ran elsewhere, into another --output-dir
        if config_file.exists():
            config = yaml.safe_load(config_file.read_text())
            for key in ("logger", "enable_progress_bar", "enable_model_summary"):
                config["trainer"].pop(key)
            where = output_dir / "best.yaml"
            _write(where, f"# {title}\n{yaml.dump(config)}")
        lines.append(f"best: {title}: {where}")
    _write(output_dir / "trials.md", "\n".join(lines) + "\n")
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")  # renamed into place: a reader never sees half a file
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None, pruner: "optuna.pruners.BasePruner | None" = None) -> None:
    with boundary():
        args, passthrough = parse(sys.argv[1:] if argv is None else argv)
        cli = build_cli(args, passthrough)  # bad settings fail here, before any trial
        cli.datamodule.prepare_data()  # decode the data once, not once per --jobs process
    args.output_dir.mkdir(parents=True, exist_ok=True)
    # No pruning in the first quarter of a run: the one-cycle warm-up makes early epochs unequal.
    warmup = max(1, cli.trainer.max_epochs // 4)
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup)
    load_study(args)  # made once here, before the --jobs processes load it
    jobs = min(args.jobs, args.trials or args.jobs)
    shares = [None if args.trials is None else len(range(i, args.trials, jobs)) for i in range(jobs)]
    # --jobs: processes, not optuna's n_jobs threads: Lightning and torch's seeding are per process.
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=optimize, args=(args, passthrough, n, pruner)) for n in shares[1:]]
    for w in workers:
        w.start()
    try:
        interrupted = optimize(args, passthrough, shares[0], pruner)  # the first share: this process
        for w in workers:
            w.join()
    except KeyboardInterrupt:
        interrupted = True
        for w in workers:
            w.join()  # each marks its running trial FAIL and stops
    print(report(load_study(args), args.output_dir))
    if interrupted:
        sys.exit("error: interrupted: the running trials are marked FAIL; run the same command to continue.")


if __name__ == "__main__":
    main()
