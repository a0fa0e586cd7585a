"""The `lit-cifar` command: LightningCLI over CIFARClassifier and CIFARDataModule.

lit-cifar fit --data.data_dir ../shared/cifar10-jpeg
lit-cifar fit --config configs/seed.yaml
lit-cifar test --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --data.data_dir DIR
lit-cifar fit --print_config
"""

import sys
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lit_cifar.callbacks import TensorBoardDashboard
from lit_cifar.data import CIFARDataModule
from lit_cifar.errors import UserError
from lit_cifar.inference import SKIPPED_EXIT, PredictionWriter, input_settings, load_model, read_checkpoint
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
}
CHECKPOINT_DEFAULTS = {
    "monitor": "val/acc",
    "mode": "max",
    "save_last": True,
    "filename": "epoch{epoch:02d}-val_acc{val/acc:.4f}",
    "auto_insert_metric_name": False,
}


class LitCifarCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("seed_everything_default", SEED)
        super().__init__(CIFARClassifier, CIFARDataModule, *args, **kwargs)

    def before_instantiate_classes(self) -> None:
        # The default logger writes under --trainer.default_root_dir when one is given.
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        logger, root = config.trainer.logger, config.trainer.default_root_dir
        if root and getattr(logger, "init_args", None) is not None and logger.init_args.save_dir == ".":
            logger.init_args.save_dir = root
        if self.subcommand in ("validate", "test", "predict"):
            self._inputs_as_trained(config)

    def _inputs_as_trained(self, config) -> None:
        # Evaluation prepares images as the checkpoint's model saw them in training (normalized or
        # [0, 1] pixels), whatever the data settings here say.
        ckpt_path = config.ckpt_path
        if self.subcommand == "predict" and not ckpt_path:
            raise UserError("predict needs a trained model: give --ckpt_path PATH/TO/last.ckpt.")
        if not ckpt_path or not Path(ckpt_path).is_file():  # "best"/"last" or missing: Lightning says
            return
        for key, value in input_settings(read_checkpoint(ckpt_path)).items():
            if config.data[key] != value:
                print(f"data.{key}={value} (as the checkpoint was trained)", file=sys.stderr)
                config.data[key] = value

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.subcommand == "predict":  # its classes and net come from the checkpoint, not the data
            self.model = load_model(self.config.predict.ckpt_path)[0]

    def add_arguments_to_parser(self, parser) -> None:
        # The number of classes and their names flow from the data into the model.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.class_names", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(PredictionWriter, "prediction")  # predict: --prediction.output
        parser.add_lightning_class_args(TensorBoardDashboard, "dashboard")  # --dashboard.inputs false, ...


def main(args: list[str] | None = None) -> None:
    try:
        cli = LitCifarCLI(args=args)
    except UserError as err:
        sys.exit(f"error: {err}")
    if cli.subcommand == "predict" and any(
        isinstance(c, PredictionWriter) and c.skipped for c in cli.trainer.callbacks
    ):
        sys.exit(SKIPPED_EXIT)  # some files could not be read (listed above)


if __name__ == "__main__":
    main()
