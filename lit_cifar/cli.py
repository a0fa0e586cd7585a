"""The `lit-cifar` command: LightningCLI over CIFARClassifier and CIFARDataModule (run folders: runs.py).

lit-cifar fit --config configs/seed.yaml --data.data_dir ../shared/cifar10-jpeg
lit-cifar test --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --data.data_dir DIR
lit-cifar fit --ckpt_path last --data.data_dir DIR   # resume the newest run, in its own log folder
"""

import logging
import math
import re
import sys
import warnings

import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lit_cifar import checkpoints, runs
from lit_cifar.dashboard import TensorBoardDashboard
from lit_cifar.data import CIFARDataModule
from lit_cifar.divergence import DivergenceGuard
from lit_cifar.errors import UserError, boundary, check_accelerator, one_line
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
# A second ModelCheckpoint keeps last.ckpt fresh within epochs: a killed run loses at most
# every_n_train_steps steps (the first one writes it at epoch ends).
LAST_CHECKPOINT_DEFAULTS = {
    "every_n_train_steps": 200,
    "save_top_k": 0,
    "save_last": True,
    "enable_version_counter": False,
}
# Lightning divides by these without checking them.
POSITIVE_TRAINER_SETTINGS = (
    "log_every_n_steps",
    "accumulate_grad_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
)
# Lightning's bar redraws after every step, in Python: on a GPU as long as a whole training step.
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
    if _no_tips not in log.filters:
        log.addFilter(_no_tips)


def _no_tips(record: logging.LogRecord) -> bool:
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


def _own(config):
    """The settings of the subcommand being run (all of them when run=False)."""
    return config[config.subcommand] if config.get("subcommand") else config


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

    def _parse(self, parser, args):
        # As LightningCLI.parse_arguments, without its warning that `args` and sys.argv were both
        # given: scripts/train.py passes args translated from its own sys.argv.
        try:
            return parser.parse_args(args)
        except ArgumentError as err:
            # the settings' own help: `lit-cifar [<subcommand>] --help`; scripts (run=False) take fit's
            words = sys.argv[1:] if args is None else [str(a) for a in args]
            sub = next((w for w in words if w in self.subcommands()), "" if self._subcommands else "fit")
            command = f"lit-cifar {sub}".strip()
            raise UserError(f"{_parse_error(err)}: see `{command} --help`.") from None

    def _settings(self) -> dict:
        """The settings as flat dotted keys, the values as a config file writes them."""
        dump = self._parser(self.config.get("subcommand")).dump(_own(self.config), skip_none=False)
        return runs.flat(yaml.safe_load(dump))

    def parse_arguments(self, parser, args) -> None:
        # Before LightningCLI reads the checkpoint's hyperparameters: resolve "last", refuse a
        # missing, foreign or unsafe file with one clear message.
        self.config = self._parse(parser, args)
        sub, config = self.config.get("subcommand"), _own(self.config)
        path = config.get("ckpt_path") if sub else self.resume
        if not path or (sub != "predict" and path.partition(":")[0] in ("best", "hpc", "registry")):
            return  # nothing to load, or Lightning's own lookups
        self.ckpt_path = runs.find_last(config) if path == "last" else str(path)
        if sub == "predict":  # the one read of the file: the model is built from it, so Lightning gets no
            # path to read again (after_instantiate_classes puts it back for the run's config.yaml)
            self._ckpt, config.ckpt_path = checkpoints.read_checkpoint(self.ckpt_path), None
            return
        self._ckpt = checkpoints.load_checkpoint(self.ckpt_path)
        checkpoints.check_hparams(self._ckpt, CIFARClassifier, self.ckpt_path)
        if sub in (None, "fit"):  # fitting from a checkpoint continues that run, with its settings
            saved = runs.saved_config(self.ckpt_path, self._ckpt, self._settings())
            if saved is not None:  # else check_fits judges the weights
                args = list(sys.argv[1:] if args is None else args)
                at = args.index(sub) + 1 if sub else 0  # the saved settings first, what is given now on top
                self.config = self._parse(
                    parser, [*args[:at], f"--config={yaml.safe_dump(saved)}", *args[at:]]
                )
                runs.refuse_changes(runs.flat(saved), self._settings(), self.ckpt_path)
            config = _own(self.config)
            if path == "last" and runs.continue_run(config, self.ckpt_path, self._ckpt.get("global_step", 0)):
                self.save_config_callback = None  # the run's config.yaml stays as the run wrote it
        if sub:
            config.ckpt_path = self.ckpt_path

    def before_instantiate_classes(self) -> None:
        config, trainer = _own(self.config), _own(self.config).trainer
        if trainer.default_root_dir and getattr(trainer.logger, "init_args", None) is not None:
            if trainer.logger.init_args.save_dir == ".":  # the default logger writes under default_root_dir
                trainer.logger.init_args.save_dir = trainer.default_root_dir
        # What the classes would only notice mid-run, or explain poorly, refused up front.
        for key, value in config.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(
                    f"{key} is {value}: every number in the settings must be finite (see --help)."
                )
        for name in POSITIVE_TRAINER_SETTINGS:
            if trainer[name] is not None and trainer[name] <= 0:
                raise UserError(f"--trainer.{name} must be above 0, got {trainer[name]}.")
        if trainer.max_epochs is not None and (trainer.max_epochs == 0 or trainer.max_epochs < -1):
            raise UserError(f"max_epochs must be at least 1 (or -1: no limit), got {trainer.max_epochs}.")
        check_accelerator(trainer.accelerator, "--trainer.accelerator")
        if self.subcommand == "predict" and self._ckpt is None:
            raise UserError("predict needs a trained model: give --ckpt_path PATH/TO/last.ckpt.")
        # Evaluation prepares images as the model saw them in training (normalized or [0, 1] pixels).
        for key, value in checkpoints.input_settings(self._ckpt or {}).items():
            if self.subcommand in ("validate", "test", "predict") and config.data[key] != value:
                print(f"data.{key}={value} (as the checkpoint was trained)", file=sys.stderr)
                config.data[key] = value

    def instantiate_trainer(self, **kwargs):
        trainer = _own(self.config_init).trainer
        callbacks = trainer.callbacks or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        own_bar = any(isinstance(c, ProgressBar) for c in callbacks)
        if trainer.enable_progress_bar is not False and not own_bar:  # unless turned off or brought along
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
        if self.subcommand == "predict":  # classes and net from the checkpoint, not from the data
            self.model = checkpoints.model_from(self._ckpt, self.ckpt_path)
            self.config.predict.ckpt_path = self.ckpt_path  # for the run's config.yaml
        elif self._ckpt is not None:
            checkpoints.check_fits(self._ckpt, self.model, self.ckpt_path, self.datamodule.classes)
        if rank_zero_only.rank == 0:  # the other ranks write nothing of their own
            runs.claim_run_folders(self.trainer, self.subcommand in (None, "fit"), self.ckpt_path)

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback  # the first ModelCheckpoint: the monitored one
        metric = getattr(ckpt, "monitor", None) or "val/acc"
        best = getattr(ckpt, "best_model_score", None)
        print_summary(
            self.trainer, metric, self.trainer.callback_metrics.get(metric) if best is None else best
        )

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
