"""Train, then test the best checkpoint, with flat flags for what people change most.

    python scripts/train.py                                      # CIFAR-10 into ./data; a GPU if there is one
    python scripts/train.py --max-epochs 1 --limit-batches 50    # a short trial run
    python scripts/train.py --config configs/seed.yaml --data-dir DIR
    python scripts/train.py --data-dir DIR --resume              # after a kill: same flags + --resume
    python scripts/train.py --model.label_smoothing 0           # any setting, as `lit-cifar fit` spells it

Every flag passes straight through to the `lit-cifar` command's classes (lit_cifar/cli.py); --help
reads their defaults from their source without importing torch. Messages name this script's flags.
"""

import ast
import re
from argparse import SUPPRESS, Namespace
from importlib.util import find_spec
from pathlib import Path

from lit_cifar.errors import ArgumentParser, boundary

FLAGS = {  # flag -> LightningCLI key
    **{k: f"trainer.{k}" for k in ("accelerator", "devices", "strategy", "num_nodes", "precision")},
    **{k: f"trainer.{k}" for k in ("max_epochs", "max_steps", "default_root_dir", "fast_dev_run")},
    **{k: f"data.{k}" for k in ("data_dir", "batch_size", "num_workers", "val_size")},
    **{"net": "model.net", "lr": "model.lr", "seed": "seed_everything"},
}
INTS = "num_nodes max_epochs max_steps batch_size num_workers seed".split()
TYPES = {"lr": float} | dict.fromkeys(INTS, int)  # the rest as typed: val_size 1 is a count, 0.1 a fraction
EPILOG = """Any other setting as `lit-cifar fit` spells it (e.g. --model.label_smoothing 0; `lit-cifar fit
--help` lists them all), or in a --config file."""
SOURCES = {  # key group -> (package, file, class): the class whose __init__ holds the defaults
    "trainer": ("lightning", "pytorch/trainer/trainer.py", "Trainer"),
    "data": ("lit_cifar", "data.py", "CIFARDataModule"),
    "model": ("lit_cifar", "module.py", "CIFARClassifier"),
}


def _source(package: str, file: str) -> list[ast.stmt]:  # finding a package does not import it
    return ast.parse(Path(find_spec(package).submodule_search_locations[0], file).read_text()).body


def _defaults() -> dict[str, object]:
    """{LightningCLI key: default}, from the classes' `__init__`, then cli.py's TRAINER_DEFAULTS and SEED."""
    found = {}
    for group, (package, file, owner) in SOURCES.items():
        cls = next(n for n in _source(package, file) if isinstance(n, ast.ClassDef) and n.name == owner)
        a = next(n for n in cls.body if getattr(n, "name", "") == "__init__").args
        args = a.args[len(a.args) - len(a.defaults) :] + a.kwonlyargs  # the ones with a default, in order
        for arg, default in zip(args, a.defaults + a.kw_defaults, strict=True):
            found[f"{group}.{arg.arg}"] = ast.unparse(default).strip("'") if default else None
    cli = {n.targets[0].id: n.value for n in _source("lit_cifar", "cli.py") if isinstance(n, ast.Assign)}
    found |= {f"trainer.{k}": v for k, v in ast.literal_eval(cli["TRAINER_DEFAULTS"]).items()}
    return found | {"seed_everything": ast.literal_eval(cli["SEED"])}


def get_args_parser() -> ArgumentParser:
    defaults = _defaults()
    parser = ArgumentParser(description=__doc__.split("\n")[0], epilog=EPILOG, argument_default=SUPPRESS)
    parser.add_argument("--config", action="append", help="a lit-cifar YAML config (repeatable)")
    for flag, key in FLAGS.items():
        name, help = f"--{flag.replace('_', '-')}", f"{key} (default: {defaults.get(key)})"
        if flag == "fast_dev_run":
            help = "a check: train, validate and test N batches (1 if no N), log and save nothing"
            parser.add_argument(name, nargs="?", const=1, type=int, metavar="N", help=help)
        else:
            parser.add_argument(name, type=TYPES.get(flag, str), help=help)
    help = "train, validate and test on N batches per epoch (a short trial: with --max-epochs 1)"
    parser.add_argument("--limit-batches", type=int, metavar="N", help=help)
    help = "continue the newest run (its last checkpoint, its log folder), or the checkpoint CKPT"
    parser.add_argument("--resume", nargs="?", const="last", metavar="CKPT", help=help)
    return parser


def parse_args(argv: list[str] | None = None) -> Namespace:
    """The flags above; what is left, `--group.key value`, is a lit-cifar setting passed through."""
    parser = get_args_parser()
    args, rest = parser.parse_known_args(argv)
    if unknown := [a for a in rest if a.startswith("--") and not re.match(r"--\w+\.\w", a)]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.settings = rest
    return args


def to_cli_args(args: Namespace) -> list[str]:
    """Flat flags -> LightningCLI arguments; configs first, so flags override them."""
    given = vars(args)
    cli_args = [f"--config={c}" for c in given.get("config", [])]
    cli_args += [f"--{FLAGS[k]}={v}" for k, v in given.items() if k in FLAGS]
    if "limit_batches" in given:  # the Trainer's three limits at once, for a short trial run
        cli_args += [
            f"--trainer.limit_{s}_batches={given['limit_batches']}" for s in "train val test".split()
        ]
    return cli_args + given.get("settings", [])


def in_our_flags(message: str) -> str:
    """A message of lit-cifar's classes with each setting that has a flag here named by that flag
    (`--trainer.accelerator cpu` -> `--accelerator cpu`); other `--group.key` settings work as they are."""
    for flag, key in FLAGS.items():
        message = re.sub(rf"--{re.escape(key)}(?![\w.])", f"--{flag.replace('_', '-')}", message)
    return message.replace("--ckpt_path last", "--resume")


def main(args: Namespace) -> None:
    # Imported once the flags are parsed: --help and a mistyped flag answer without loading torch.
    from lit_cifar.cli import LitCifarCLI, print_summary

    with boundary(rewrite=in_our_flags):
        cli = LitCifarCLI(args=to_cli_args(args), run=False, resume=getattr(args, "resume", None))
        trainer, model, data = cli.trainer, cli.model, cli.datamodule
        trainer.fit(model, datamodule=data, ckpt_path=cli.ckpt_path)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
        run, metric = (trainer.test, "test/acc") if data.has_test else (trainer.validate, "val/acc")
        results = run(model, datamodule=data, ckpt_path=best or None)
    print_summary(trainer, metric, results[0].get(metric) if results else None)


if __name__ == "__main__":
    main(parse_args())
