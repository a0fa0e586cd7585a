"""The `lit-cifar` command: LightningCLI over CIFARClassifier and CIFARDataModule.

lit-cifar fit --data.data_dir ../shared/cifar10-jpeg
lit-cifar fit --config configs/seed.yaml
lit-cifar test --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --data.data_dir DIR
lit-cifar fit --print_config
lit-cifar fit --ckpt_path last --data.data_dir DIR   # resume the newest run, in its own log folder
"""

import glob
import math
import os
import re
import shutil
import sys
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lit_cifar.callbacks import TensorBoardDashboard
from lit_cifar.data import CIFARDataModule
from lit_cifar.errors import UserError, boundary, on_failure, one_line
from lit_cifar.guards import (
    DivergenceGuard,
    check_accelerator,
    check_fits,
    check_hparams,
    check_writable,
    load_checkpoint,
)
from lit_cifar.inference import SKIPPED_EXIT, PredictionWriter, input_settings, load_model
from lit_cifar.module import CIFARClassifier

SEED = 0  # seed_everything: runs repeat exactly unless a user asks for another seed
# The Trainer is Lightning's class, so its project defaults live here, read by every entry point.
TRAINER_DEFAULTS = {
    "max_epochs": 20,
    "log_every_n_steps": 50,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": ".", "default_hp_metric": False, "log_graph": True},
    },
    "plugins": {"class_path": "lit_cifar.guards.SafeCheckpointIO"},  # atomic writes, weights-only reads
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


POSITIVE_TRAINER_SETTINGS = (
    "log_every_n_steps",
    "accumulate_grad_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
)

# Lightning's bar redraws after every step, ~0.3 ms of Python each time (measured): on a GPU as
# long as a whole training step. The CLI's bar redraws every PROGRESS_BAR_REFRESH_RATE steps.
PROGRESS_BAR_REFRESH_RATE = 20


class LitCifarCLI(LightningCLI):
    def __init__(self, *args, resume: str | None = None, **kwargs) -> None:
        """`resume` (for run=False, as scripts/train.py does): a checkpoint to continue from, or
        "last": the newest run's. `self.ckpt_path` is then the file to give `trainer.fit`."""
        self.resume, self.ckpt_path, self._ckpt = resume, None, None
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("seed_everything_default", SEED)
        super().__init__(CIFARClassifier, CIFARDataModule, *args, **kwargs)

    def init_parser(self, **kwargs):
        # A parse error raises (to main()'s one line) instead of printing the whole usage.
        return super().init_parser(**{**kwargs, "exit_on_error": False})

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            words = sys.argv[1:] if args is None else [str(a) for a in args]
            command = " ".join([parser.prog, *[w for w in words if w in self.subcommands()][:1]])
            raise UserError(f"{_parse_error(err)}: see `{command} --help`.") from None
        # Before LightningCLI reads the checkpoint's hyperparameters: resolve "last", refuse a
        # missing, foreign or unsafe file with one clear message.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        path = config.get("ckpt_path") if subcommand else self.resume
        if not path or path in ("best", "hpc", "registry") or path.startswith("registry:"):
            return  # nothing to load, or Lightning's own lookups
        resuming = path == "last" and subcommand in (None, "fit")
        self.ckpt_path = self._find_last(config) if path == "last" else str(path)
        self._ckpt = load_checkpoint(self.ckpt_path)
        check_hparams(self._ckpt, CIFARClassifier, self.ckpt_path)
        if subcommand:
            config.ckpt_path = self.ckpt_path
        if resuming:
            self._continue_run(config, Path(self.ckpt_path), self._ckpt.get("global_step", 0))

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
                f"nothing to resume: no {pattern}. Start a new run (without --ckpt_path last / --resume), "
                f"or run from the folder (or with the --trainer.default_root_dir) of the run to continue."
            )
        last = max(found, key=lambda p: p.stat().st_mtime)
        print(f"resuming from {last}", file=sys.stderr)
        return str(last)

    def _continue_run(self, config, last: Path, global_step: int) -> None:
        """Log into the run's own folder: its version, its config.yaml rewritten, not a new run."""
        init = getattr(config.trainer.logger, "init_args", None)
        if init is None or config.checkpoint.dirpath or last.parent.name != "checkpoints":
            return  # checkpoints placed by the user: the logs go to a new version as usual
        run = last.parent.parent.name  # version_3 -> 3; a named version stays a name
        num = run.removeprefix("version_")
        init.version = int(num) if run.startswith("version_") and num.isdigit() else run
        if "purge_step" in vars(init) and init.purge_step is None:
            init.purge_step = int(global_step) + 1  # TensorBoard hides what was logged after the checkpoint
        self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": True}

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
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:  # a bad --trainer.* setting
            raise UserError(f"{err} (see `lit-cifar fit --help` for the --trainer settings)") from None

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self._ckpt is not None and self.subcommand != "predict":  # predict builds its own model
            check_fits(self._ckpt, self.model, self.ckpt_path, self.datamodule.classes)
        if rank_zero_only.rank == 0:  # the other ranks write nothing of their own
            self._claim_run_folders()
        if self.subcommand == "predict":  # its classes and net come from the checkpoint, not the data
            self.model = load_model(self.config.predict.ckpt_path)[0]

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
                        f"this run would overwrite them. Continue that run with --ckpt_path last (lit-cifar fit) "
                        f"or --resume (scripts/train.py), or give this one its own {folders[folder]}."
                    )
        earlier = [
            p.name for p in (log_dir / "config.yaml", *log_dir.glob("events.out.tfevents.*")) if p.exists()
        ]
        if earlier and not self.save_config_kwargs.get("overwrite"):
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


def main(args: list[str] | None = None) -> None:
    with boundary():
        cli = LitCifarCLI(args=args)
    if cli.subcommand == "predict" and any(
        isinstance(c, PredictionWriter) and c.skipped for c in cli.trainer.callbacks
    ):
        sys.exit(SKIPPED_EXIT)  # some files could not be read (listed above)


if __name__ == "__main__":
    main()
