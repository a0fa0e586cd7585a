"""Train, then test the best checkpoint, with flat flags for what people change most.

    python scripts/train.py                                      # CIFAR-10 into ./data; a GPU if there is one
    python scripts/train.py --max-epochs 1 --limit-batches 50    # a short trial run
    python scripts/train.py --data-dir DIR --net seed_bn --max-epochs 20
    python scripts/train.py --config configs/seed.yaml --data-dir DIR
    python scripts/train.py --data-dir DIR --resume              # after a kill: same flags + --resume
    python scripts/train.py --model.label_smoothing 0           # any setting, as `lit-cifar fit` spells it

Every flag passes straight through to the `lit-cifar` command's classes (lit_cifar/cli.py). The
defaults shown in --help are read from those classes' source, never restated here, and without
importing torch or Lightning, so --help answers at once. Messages name this script's flags.
"""

import argparse
import ast
import importlib.util
import re
from pathlib import Path

from lit_cifar.errors import ArgumentParser

# flag -> (LightningCLI key, the class whose __init__ holds its default; None: lit_cifar/cli.py's SEED)
FLAGS = {
    "accelerator": ("trainer.accelerator", "Trainer"),
    "devices": ("trainer.devices", "Trainer"),
    "strategy": ("trainer.strategy", "Trainer"),
    "num_nodes": ("trainer.num_nodes", "Trainer"),
    "precision": ("trainer.precision", "Trainer"),
    "max_epochs": ("trainer.max_epochs", "Trainer"),
    "max_steps": ("trainer.max_steps", "Trainer"),
    "default_root_dir": ("trainer.default_root_dir", "Trainer"),
    "fast_dev_run": ("trainer.fast_dev_run", "Trainer"),
    "data_dir": ("data.data_dir", "CIFARDataModule"),
    "batch_size": ("data.batch_size", "CIFARDataModule"),
    "num_workers": ("data.num_workers", "CIFARDataModule"),
    "val_size": ("data.val_size", "CIFARDataModule"),
    "net": ("model.net", "CIFARClassifier"),
    "lr": ("model.lr", "CIFARClassifier"),
    "seed": ("seed_everything", None),
}
TYPES = {
    "num_nodes": int,
    "max_epochs": int,
    "max_steps": int,
    "batch_size": int,
    "num_workers": int,
    "lr": float,
    "seed": int,
    # val_size: passed as typed (1 a count, 0.1 a fraction; 1.0 is refused as ambiguous)
}
# --limit-batches N: the Trainer's three limits at once, for a short trial run.
LIMITS = ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches")
SOURCES = {  # class -> (package, file): read as text, not imported
    "Trainer": ("lightning", "pytorch/trainer/trainer.py"),
    "CIFARDataModule": ("lit_cifar", "data.py"),
    "CIFARClassifier": ("lit_cifar", "module.py"),
}


def _source(package: str, name: str) -> ast.Module:
    """A file of an installed package, parsed; finding a top-level package does not import it."""
    folder = importlib.util.find_spec(package).submodule_search_locations[0]
    return ast.parse((Path(folder) / name).read_text())


def _literal(node: ast.expr) -> object:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def _defaults() -> dict[str, object]:
    """Each flag's default, from the `__init__` that owns it (and lit_cifar/cli.py's TRAINER_DEFAULTS, SEED)."""
    cli = {
        t.id: n.value
        for n in _source("lit_cifar", "cli.py").body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    found = {"Trainer": _literal(cli["TRAINER_DEFAULTS"]), None: {"seed_everything": _literal(cli["SEED"])}}
    for owner, (package, name) in SOURCES.items():
        cls = next(n for n in _source(package, name).body if isinstance(n, ast.ClassDef) and n.name == owner)
        init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        a = init.args
        pairs = [
            *zip(a.args[len(a.args) - len(a.defaults) :], a.defaults, strict=True),
            *zip(a.kwonlyargs, a.kw_defaults, strict=True),
        ]
        # a project default (TRAINER_DEFAULTS) wins over the class's own
        found[owner] = {arg.arg: _literal(d) for arg, d in pairs if d is not None} | found.get(owner, {})
    return {flag: found[owner].get(key.split(".")[-1]) for flag, (key, owner) in FLAGS.items()}


def get_args_parser() -> argparse.ArgumentParser:
    defaults = _defaults()
    parser = ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any other setting as `lit-cifar fit` spells it (e.g. --model.label_smoothing 0; "
        "`lit-cifar fit --help` lists them all), or in a --config file.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", action="append", help="a lit-cifar YAML config (repeatable)")
    for flag, (key, _) in FLAGS.items():
        name, help = f"--{flag.replace('_', '-')}", f"{key} (default: {defaults[flag]})"
        if flag == "fast_dev_run":
            help = "a check: train, validate and test N batches (1 if no N), log and save nothing"
            parser.add_argument(name, nargs="?", const=1, type=int, metavar="N", help=help)
        else:
            parser.add_argument(name, type=TYPES.get(flag, str), help=help)
    parser.add_argument(
        "--limit-batches",
        type=int,
        metavar="N",
        help="train, validate and test on N batches per epoch (a short trial: with --max-epochs 1)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="CKPT",
        help="continue the newest run (its last checkpoint, its log folder), or the checkpoint CKPT",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags above; what is left, `--group.key value`, is a lit-cifar setting passed through."""
    parser = get_args_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--") and not re.match(r"--\w+\.\w", a)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.settings = rest
    return args


def to_cli_args(args: argparse.Namespace) -> list[str]:
    """Flat flags -> LightningCLI arguments; configs first, so flags override them."""
    given = vars(args)
    cli_args = [f"--config={c}" for c in given.get("config", [])]
    cli_args += [f"--{FLAGS[k][0]}={v}" for k, v in given.items() if k in FLAGS]
    cli_args += [f"--{key}={given['limit_batches']}" for key in LIMITS if "limit_batches" in given]
    return cli_args + given.get("settings", [])


def in_our_flags(message: str) -> str:
    """A message of lit-cifar's classes with each setting that has a flag here named by that flag
    (`--trainer.accelerator cpu` -> `--accelerator cpu`); other `--group.key` settings work as they are."""
    for flag, (key, _) in FLAGS.items():
        message = re.sub(rf"--{re.escape(key)}(?![\w.])", f"--{flag.replace('_', '-')}", message)
    return message.replace("--ckpt_path last", "--resume")


def main(args: argparse.Namespace) -> None:
    # Imported once the flags are parsed: --help and a mistyped flag answer without loading torch.
    from lit_cifar.cli import LitCifarCLI, print_summary
    from lit_cifar.errors import boundary

    with boundary(rewrite=in_our_flags):
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
    print_summary(trainer, metric, results[0].get(metric) if results else None)


if __name__ == "__main__":
    main(parse_args())
