"""The `lit-cifar` command: LightningCLI over CIFARClassifier and CIFARDataModule.

lit-cifar fit --data.data_dir ../shared/cifar10-jpeg
lit-cifar fit --config configs/seed.yaml
lit-cifar test --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --data.data_dir DIR
lit-cifar fit --print_config
lit-cifar fit --ckpt_path last --data.data_dir DIR   # resume the newest run, in its own log folder
"""

import glob
import logging
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lit_cifar.checkpoints import check_fits, check_hparams, input_settings, load_checkpoint, load_model
from lit_cifar.dashboard import TensorBoardDashboard
from lit_cifar.data import CIFARDataModule
from lit_cifar.divergence import DivergenceGuard
from lit_cifar.errors import UserError, boundary, check_accelerator, check_writable, on_failure, one_line
from lit_cifar.module import CIFARClassifier
from lit_cifar.prediction import SKIPPED_EXIT, PredictionWriter

SEED = 0  # seed_everything: runs repeat exactly unless a user asks for another seed
# The Trainer is Lightning's class, so its project defaults live here, read by every entry point.
TRAINER_DEFAULTS = {
    "max_epochs": 20,
    "log_every_n_steps": 50,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": ".", "default_hp_metric": False, "log_graph": True},
    },
    "plugins": {"class_path": "lit_cifar.checkpoints.SafeCheckpointIO"},  # atomic writes, weights-only reads
}
CHECKPOINT_DEFAULTS = {
    "monitor": "val/acc",
    "mode": "max",
    "save_last": True,
    "filename": "epoch{epoch:02d}-val_acc{val/acc:.4f}",
    "auto_insert_metric_name": False,
    "enable_version_counter": False,  # last.ckpt is shared with LAST_CHECKPOINT_DEFAULTS' callback
}
# A second ModelCheckpoint keeps last.ckpt fresh within epochs, so a killed run loses at most
# every_n_train_steps steps (the first one writes it at epoch ends).
LAST_CHECKPOINT_DEFAULTS = {
    "every_n_train_steps": 200,
    "save_top_k": 0,
    "save_last": True,
    "enable_version_counter": False,
}


# Settings a resumed run may take from the command line rather than from its saved config: where
# and how it runs and what it reports (prefixes of dotted keys). Everything else (the model, the
# data and its split, batch size, seed, the Trainer's training settings) changes what is trained,
# and must be the run's own; trainer.max_epochs may grow.
RESUME_MAY_CHANGE = (
    "ckpt_path",
    "trainer.accelerator",
    "trainer.callbacks",
    "trainer.logger",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.num_sanity_val_steps",
    "trainer.profiler",
    "trainer.plugins",
    "data.data_dir",
    "data.download",
    "data.num_workers",
    "data.pin_memory",
    "data.predict_dir",
    "checkpoint",
    "last_checkpoint",
    "lr_monitor",
    "divergence_guard",
    "dashboard",
    "prediction",
)
POSITIVE_TRAINER_SETTINGS = (
    "log_every_n_steps",
    "accumulate_grad_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
)

# Lightning's bar redraws after every step, ~0.3 ms of Python each time (measured): on a GPU as
# long as a whole training step. The CLI's bar redraws every PROGRESS_BAR_REFRESH_RATE steps.
PROGRESS_BAR_REFRESH_RATE = 20


def quiet_upstream_notices() -> None:
    """Silence, by exact message, what upstream prints on every normal run and a newcomer reads
    as an error. The one place such notices are filtered; anything else still shows."""
    # torch.utils.tensorboard's add_graph (TensorBoard's Graphs tab) still traces with torch.jit, and
    # scripts/export.py's TorchScript (what C++ and mobile runtimes load) is torch.jit.script and load.
    warnings.filterwarnings(
        "ignore", r"`torch\.jit\.(trace(_method)?|script|load)` is deprecated", FutureWarning
    )
    # Lightning's pytree helper on torch >= 2.10: Lightning-AI/pytorch-lightning#21326.
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # The "💡 Tip" adverts (litlogger, litmodels): Lightning has no setting for them.
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in log.filters):
        log.addFilter(_NoTips())


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def print_summary(trainer, metric: str, value: float | None) -> None:
    """The line a training run ends with (scripts/train.py and `lit-cifar fit`): accuracy, best
    checkpoint, log folder."""
    if not trainer.is_global_zero:
        return
    # trainer.log_dir broadcasts from rank 0: a collective that the other ranks (returned above)
    # never join under DDP. The logger's own log_dir is local.
    logs = trainer.logger.log_dir if trainer.logger else None
    value = float(value) if value is not None else math.nan
    acc = f"{metric} {value:.4f}" if math.isfinite(value) else f"{metric} not measured"
    ckpt = trainer.checkpoint_callback
    best = (ckpt.best_model_path if ckpt else "") or "(none saved)"
    print(f"{acc} | best checkpoint: {best} | logs: {logs or '(none written)'}")


class LitCifarCLI(LightningCLI):
    def __init__(self, *args, resume: str | None = None, **kwargs) -> None:
        """`resume` (for run=False, as scripts/train.py does): a checkpoint to continue from, or
        "last": the newest run's. `self.ckpt_path` is then the file to give `trainer.fit`."""
        quiet_upstream_notices()
        self.resume, self.ckpt_path, self._ckpt = resume, None, None
        self._subcommands = kwargs.get("run", True)  # run=False: one parser, fit's settings
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("seed_everything_default", SEED)
        super().__init__(CIFARClassifier, CIFARDataModule, *args, **kwargs)

    def init_parser(self, **kwargs):
        # A parse error raises (to main()'s one line) instead of printing the whole usage.
        return super().init_parser(**{**kwargs, "exit_on_error": False})

    def parse_arguments(self, parser, args) -> None:
        # As LightningCLI.parse_arguments, without its warning that `args` and sys.argv were both
        # given: scripts/train.py passes args translated from its own sys.argv.
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as err:
            # the settings' own help: `lit-cifar [<subcommand>] --help`; scripts (run=False) take fit's
            words = sys.argv[1:] if args is None else [str(a) for a in args]
            sub = next((w for w in words if w in self.subcommands()), "" if self._subcommands else "fit")
            command = f"lit-cifar {sub}".strip()
            raise UserError(f"{_parse_error(err)}: see `{command} --help`.") from None
        # Before LightningCLI reads the checkpoint's hyperparameters: resolve "last", refuse a
        # missing, foreign or unsafe file with one clear message.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        path = config.get("ckpt_path") if subcommand else self.resume
        if not path or path in ("best", "hpc", "registry") or path.startswith("registry:"):
            return  # nothing to load, or Lightning's own lookups
        self.ckpt_path = self._find_last(config) if path == "last" else str(path)
        self._ckpt = load_checkpoint(self.ckpt_path)
        check_hparams(self._ckpt, CIFARClassifier, self.ckpt_path)
        if subcommand in (None, "fit"):  # fitting from a checkpoint continues that run
            self._as_trained(parser, args)
            config = self.config[subcommand] if subcommand else self.config
        if subcommand:
            config.ckpt_path = self.ckpt_path
        if path == "last" and subcommand in (None, "fit"):
            self._continue_run(config, Path(self.ckpt_path), self._ckpt.get("global_step", 0))

    def _as_trained(self, parser, args) -> None:
        """Parse again over the run's saved settings, so that what is given now overrides them; refuse
        what would change what is trained (all but RESUME_MAY_CHANGE), allow more epochs."""
        saved = self._saved_config(Path(self.ckpt_path))
        if saved is None or isinstance(args, dict):  # no saved settings: check_fits judges the weights
            return
        subcommand = self.config.get("subcommand")
        args = list(sys.argv[1:] if args is None else args)
        at = args.index(subcommand) + 1 if subcommand else 0
        self.config = parser.parse_args([*args[:at], f"--config={yaml.safe_dump(saved)}", *args[at:]])
        sub_parser = self._parser(subcommand)
        config = self.config[subcommand] if subcommand else self.config
        now = _flat(yaml.safe_load(sub_parser.dump(config, skip_none=False)))
        was = _flat(saved)
        changed = [
            key
            for key in was
            if key in now
            and now[key] != was[key]
            and not any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE)
        ]
        epochs = "trainer.max_epochs"
        if epochs in changed and _more_epochs(was[epochs], now[epochs]):
            changed.remove(epochs)
            print(f"training extended: max_epochs {was[epochs]} -> {now[epochs]}", file=sys.stderr)
        if changed:
            raise UserError(
                f"{self.ckpt_path} continues a run trained with other settings than given now; a resumed "
                f"run keeps its own (drop these, or start a new run to change them):\n"
                + "\n".join(f"  --{key}: {was[key]!r} in the run, {now[key]!r} given" for key in changed)
            )

    def _saved_config(self, ckpt_path: Path) -> dict | None:
        """The settings the run was trained with: its config.yaml (SaveConfigCallback's), else the
        model's and the data's hyperparameters in the checkpoint; only keys this CLI knows."""
        run_config = ckpt_path.parent.parent / "config.yaml"
        if ckpt_path.parent.name == "checkpoints" and run_config.is_file():
            saved = yaml.safe_load(run_config.read_text()) or {}
        else:
            saved = {
                "model": self._ckpt.get("hyper_parameters") or {},
                "data": self._ckpt.get("datamodule_hyper_parameters") or {},
            }
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        known = _flat(yaml.safe_load(self._parser(subcommand).dump(config, skip_none=False)))
        saved = {k: v for k, v in saved.items() if k in known or any(n.startswith(k + ".") for n in known)}
        for section in ("model", "data"):  # link targets (num_classes, class_names) and old settings out
            if isinstance(saved.get(section), dict):
                saved[section] = {k: v for k, v in saved[section].items() if f"{section}.{k}" in known}
        saved.pop("ckpt_path", None)
        return saved if any(saved.values()) else None

    @staticmethod
    def _find_last(config) -> str:
        """The last.ckpt written most recently by any run under the log folder (or checkpoint.dirpath)."""
        logger, root = config.trainer.logger, config.trainer.default_root_dir or "."
        init = getattr(logger, "init_args", None)
        if config.checkpoint.dirpath:  # the user placed checkpoints themselves
            pattern = glob.escape(os.path.join(config.checkpoint.dirpath, "last.ckpt"))
        elif init is not None and {"save_dir", "name", "version"} <= set(vars(init)):  # TensorBoard, CSV
            runs = os.path.normpath(
                os.path.join(root if init.save_dir == "." else init.save_dir, init.name or "")
            )
            pattern = os.path.join(glob.escape(runs), "*", "checkpoints", "last.ckpt")
        elif logger is False:  # no logger: Lightning writes to default_root_dir/checkpoints
            pattern = glob.escape(os.path.join(root, "checkpoints", "last.ckpt"))
        else:
            raise UserError(
                "--ckpt_path last cannot find the runs of this logger: give the checkpoint's path."
            )
        found = [Path(p) for p in glob.glob(pattern)]
        if not found:
            raise UserError(
                f"nothing to resume: no {pattern}. Start a new run (without --ckpt_path last), "
                f"or run from the folder (or with the --trainer.default_root_dir) of the run to continue."
            )
        last = max(found, key=lambda p: p.stat().st_mtime)
        print(f"resuming from {last}", file=sys.stderr)
        return str(last)

    def _continue_run(self, config, last: Path, global_step: int) -> None:
        """Log into the run's own folder, its version (not a new run), leaving its config.yaml as it is."""
        init = getattr(config.trainer.logger, "init_args", None)
        if init is None or config.checkpoint.dirpath or last.parent.name != "checkpoints":
            return  # checkpoints placed by the user: the logs go to a new version as usual
        run = last.parent.parent.name  # version_3 -> 3; a named version stays a name
        num = run.removeprefix("version_")
        init.version = int(num) if run.startswith("version_") and num.isdigit() else run
        if "purge_step" in vars(init) and init.purge_step is None:
            # TensorBoard hides what the killed run logged after the checkpoint: the resumed run logs
            # again from step global_step on (the learning rate of the next batch first; the loss of
            # the checkpoint's own step was logged at global_step - 1)
            init.purge_step = int(global_step)
        self.save_config_callback = None  # the run's config.yaml stays as the run wrote it

    def before_instantiate_classes(self) -> None:
        # The default logger writes under --trainer.default_root_dir when one is given.
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        logger, root = config.trainer.logger, config.trainer.default_root_dir
        if root and getattr(logger, "init_args", None) is not None and logger.init_args.save_dir == ".":
            logger.init_args.save_dir = root
        self._check_settings(config)
        if self.subcommand in ("validate", "test", "predict"):
            self._inputs_as_trained(config)

    def _inputs_as_trained(self, config) -> None:
        # Evaluation prepares images as the checkpoint's model saw them in training (normalized or
        # [0, 1] pixels), whatever the data settings here say.
        ckpt_path = config.ckpt_path
        if self.subcommand == "predict" and not ckpt_path:
            raise UserError("predict needs a trained model: give --ckpt_path PATH/TO/last.ckpt.")
        if self._ckpt is None:  # no file read in parse_arguments ("best", ...): Lightning resolves it
            return
        for key, value in input_settings(self._ckpt).items():
            if config.data[key] != value:
                print(f"data.{key}={value} (as the checkpoint was trained)", file=sys.stderr)
                config.data[key] = value

    @staticmethod
    def _check_settings(config) -> None:
        # What the classes would only notice mid-run, or explain poorly, refused up front.
        for key, value in config.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(
                    f"{key} is {value}: every number in the settings must be finite (see --help)."
                )
        trainer = config.trainer
        for name in POSITIVE_TRAINER_SETTINGS:  # Lightning divides by these without checking them
            if trainer[name] is not None and trainer[name] <= 0:
                raise UserError(f"--trainer.{name} must be above 0, got {trainer[name]}.")
        epochs = trainer.max_epochs
        if epochs is not None and (epochs == 0 or epochs < -1):
            raise UserError(f"max_epochs must be at least 1 (or -1: no limit), got {epochs}.")
        check_accelerator(trainer.accelerator, "--trainer.accelerator")

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        callbacks = config.trainer.callbacks or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.trainer.enable_progress_bar is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):  # unless the user turned the bar off or brought their own
            kwargs["callbacks"] = [*callbacks, TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_RATE)]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:  # a bad --trainer.* setting
            raise UserError(f"{err} (see `lit-cifar fit --help` for the --trainer settings)") from None
        if trainer.fast_dev_run:  # a check writes no checkpoint: ModelCheckpoint.on_train_end saves
            for callback in trainer.checkpoint_callbacks:  # last.ckpt even then (Lightning PR #20960)
                callback.save_last = False
        return trainer

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self._ckpt is not None and self.subcommand != "predict":  # predict builds its own model
            check_fits(self._ckpt, self.model, self.ckpt_path, self.datamodule.classes)
        if rank_zero_only.rank == 0:  # the other ranks write nothing of their own
            self._claim_run_folders()
        if self.subcommand == "predict":  # its classes and net come from the checkpoint, not the data
            self.model = load_model(self.config.predict.ckpt_path)[0]

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback  # the first ModelCheckpoint: the monitored one
        metric = getattr(ckpt, "monitor", None) or "val/acc"
        best = getattr(ckpt, "best_model_score", None)
        print_summary(
            self.trainer, metric, best if best is not None else self.trainer.callback_metrics.get(metric)
        )

    def _claim_run_folders(self) -> None:
        """Refuse to write into another run's folders; have a failed start leave no folder behind."""
        trainer = self.trainer
        if trainer.log_dir is None:  # fast_dev_run: no logs, no checkpoints
            return
        log_dir = Path(trainer.log_dir)
        folders = {log_dir: "--trainer.default_root_dir"}
        resumed = (
            Path(self.ckpt_path).parent.resolve()
            if self.ckpt_path and self.subcommand in (None, "fit")
            else None
        )
        if self.subcommand in (None, "fit"):
            for cb in trainer.checkpoint_callbacks:
                folder = Path(cb.dirpath) if cb.dirpath else log_dir / "checkpoints"
                folders[folder] = "--checkpoint.dirpath" if cb.dirpath else folders[log_dir]
                if folder.resolve() != resumed and any(folder.glob("*.ckpt")):
                    raise UserError(
                        f"{folder} holds another run's checkpoints ({', '.join(p.name for p in folder.glob('*.ckpt'))}): "
                        f"this run would overwrite them. Continue that run with --ckpt_path last, or give this "
                        f"one its own {folders[folder]}."
                    )
        earlier = [
            p.name for p in (log_dir / "config.yaml", *log_dir.glob("events.out.tfevents.*")) if p.exists()
        ]
        if earlier and not (resumed and resumed.is_relative_to(log_dir.resolve())):  # not its own run
            raise UserError(
                f"{log_dir} holds another run's logs ({', '.join(earlier[:3])}): this run would mix its logs "
                f"in. Give it another folder (the logger's version, or --trainer.default_root_dir)."
            )
        for folder, setting in folders.items():
            check_writable(folder, setting)
        # the top-most folder that writing each folder creates: what a failed start removes again
        created = {[p for p in (f, *f.parents) if not p.exists()][-1] for f in folders if not f.exists()}

        def undo() -> None:  # only what this run created, only when it did no work worth keeping
            if trainer.global_step == 0:
                for top in created:
                    if top.is_dir() and not any(top.rglob("*.ckpt")):
                        shutil.rmtree(top, ignore_errors=True)

        on_failure(undo)

    def add_arguments_to_parser(self, parser) -> None:
        # The number of classes and their names flow from the data into the model.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.class_names", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")  # step-based last.ckpt
        parser.set_defaults({f"last_checkpoint.{k}": v for k, v in LAST_CHECKPOINT_DEFAULTS.items()})
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")  # one last.ckpt
        parser.add_lightning_class_args(DivergenceGuard, "divergence_guard")
        parser.add_lightning_class_args(PredictionWriter, "prediction")  # predict: --prediction.output
        parser.add_lightning_class_args(TensorBoardDashboard, "dashboard")  # --dashboard.inputs false, ...


def _parse_error(err: ArgumentError) -> str:
    """jsonargparse's message in one line; a rejected value as `KEY: expected TYPES, got VALUE`."""
    text = re.sub(r"Given value type: <class '\w+'>", "", one_line(err)).rstrip(".")
    found = re.match(r'Parser key "([^"]+)":.*(?:Given|Got) value: (.*)$', text)
    if found is None:
        return text
    types = ", ".join(t for t in dict.fromkeys(re.findall(r"<class '(\w+)'>", text)) if t != "NoneType")
    return f"{found.group(1)}: {f'expected {types}, ' if types else ''}got {found.group(2)!r}, not an accepted value"


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other values stay whole."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _more_epochs(was, now) -> bool:
    """Whether max_epochs `now` trains longer than `was` (-1: no limit)."""
    return was is not None and was != -1 and (now == -1 or (now is not None and now > was))


def main(args: list[str] | None = None) -> None:
    with boundary():
        cli = LitCifarCLI(args=args)
    if cli.subcommand == "predict" and any(
        isinstance(c, PredictionWriter) and c.skipped for c in cli.trainer.callbacks
    ):
        sys.exit(SKIPPED_EXIT)  # some files could not be read (listed above)


if __name__ == "__main__":
    main()
