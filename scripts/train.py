"""Train, then test the best checkpoint, with flat flags for what people change most.

    python scripts/train.py --accelerator gpu
    python scripts/train.py --data-dir ../shared/cifar10-jpeg --net seed_bn --max-epochs 20
    python scripts/train.py --config configs/seed.yaml --data-dir ../shared/cifar10-jpeg
    python scripts/train.py --data-dir ../shared/cifar10-jpeg --resume    # after a kill: same flags + --resume

Every flag passes straight through to the `lit-cifar` command's classes (lit_cifar/cli.py), so the
defaults shown in --help are read from those classes, never restated here; any other setting
goes through a YAML file given with --config (see `lit-cifar fit --print_config`).
"""

import argparse
import inspect

import lightning as L

from lit_cifar.cli import SEED, TRAINER_DEFAULTS, LitCifarCLI
from lit_cifar.data import CIFARDataModule
from lit_cifar.errors import ArgumentParser, boundary
from lit_cifar.module import CIFARClassifier

# flag -> (LightningCLI key, where its default lives)
FLAGS = {
    "accelerator": ("trainer.accelerator", "trainer"),
    "devices": ("trainer.devices", "trainer"),
    "strategy": ("trainer.strategy", "trainer"),
    "num_nodes": ("trainer.num_nodes", "trainer"),
    "precision": ("trainer.precision", "trainer"),
    "max_epochs": ("trainer.max_epochs", "trainer"),
    "default_root_dir": ("trainer.default_root_dir", "trainer"),
    "fast_dev_run": ("trainer.fast_dev_run", "trainer"),
    "data_dir": ("data.data_dir", CIFARDataModule),
    "batch_size": ("data.batch_size", CIFARDataModule),
    "num_workers": ("data.num_workers", CIFARDataModule),
    "val_size": ("data.val_size", CIFARDataModule),
    "net": ("model.net", CIFARClassifier),
    "lr": ("model.lr", CIFARClassifier),
    "seed": ("seed_everything", None),
}
TYPES = {
    "num_nodes": int,
    "max_epochs": int,
    "batch_size": int,
    "num_workers": int,
    "lr": float,
    "seed": int,
    # val_size: passed as typed (1 a count, 0.1 a fraction; 1.0 is refused as ambiguous)
}


def _default(flag: str) -> object:
    """The default a flag falls back to, read from where it is defined."""
    key, owner = FLAGS[flag]
    name = key.split(".")[-1]
    if owner is None:
        return SEED
    if owner == "trainer":
        return TRAINER_DEFAULTS.get(name, inspect.signature(L.Trainer).parameters[name].default)
    return inspect.signature(owner).parameters[name].default


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", action="append", help="a lit-cifar YAML config (repeatable)")
    for flag, (key, _) in FLAGS.items():
        if flag == "fast_dev_run":
            parser.add_argument(
                "--fast-dev-run", nargs="?", const=1, type=int, help="run N batches as a check"
            )
            continue
        parser.add_argument(
            f"--{flag.replace('_', '-')}",
            type=TYPES.get(flag, str),
            help=f"{key} (default: {_default(flag)})",
        )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="CKPT",
        help="continue the newest run (its last checkpoint, its log folder), or the checkpoint CKPT",
    )
    return parser


def to_cli_args(args: argparse.Namespace) -> list[str]:
    """Flat flags -> LightningCLI arguments; configs first, so flags override them."""
    given = vars(args)
    cli_args = [f"--config={c}" for c in given.get("config", [])]
    cli_args += [f"--{FLAGS[k][0]}={v}" for k, v in given.items() if k in FLAGS]
    return cli_args


def main(args: argparse.Namespace) -> None:
    with boundary():
        cli = LitCifarCLI(args=to_cli_args(args), run=False, resume=getattr(args, "resume", None))
        trainer, model, data = cli.trainer, cli.model, cli.datamodule
        trainer.fit(model, datamodule=data, ckpt_path=cli.ckpt_path)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        ckpt = best or None
        results = (
            trainer.test(model, datamodule=data, ckpt_path=ckpt)
            if data.has_test
            else trainer.validate(model, datamodule=data, ckpt_path=ckpt)
        )
    metric = "test/acc" if data.has_test else "val/acc"
    acc = results[0].get(metric, float("nan")) if results else float("nan")
    print(f"{metric} {acc:.4f} | best checkpoint: {best or '(none saved)'} | logs: {trainer.log_dir}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
