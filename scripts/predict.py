"""Predict the classes of your own images with a trained checkpoint; write a CSV, print a table.

    python scripts/predict.py lightning_logs/version_0/checkpoints/last.ckpt photos/ cat.jpg
    python scripts/predict.py last.ckpt photos/ --output out/predictions.csv --batch-size 256

Any PNG/JPEG (folders: searched recursively) is made as CIFAR's images were, then prepared as the
training data was. Exit status 0, 3 when unreadable files were skipped (listed), 1 on an error.
The same as `lit-cifar predict --ckpt_path CKPT --data.predict_dir DIR`.
"""

import sys
from argparse import SUPPRESS, Namespace

import lightning as L

from lit_cifar.checkpoints import load_model
from lit_cifar.data import CIFARDataModule
from lit_cifar.errors import ArgumentParser, UserError, boundary, check_accelerator
from lit_cifar.prediction import SKIPPED_EXIT, PredictionWriter


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0], argument_default=SUPPRESS)
    parser.add_argument("ckpt", help="a checkpoint written by training (.ckpt)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="images, or folders of them")
    parser.add_argument("--output", help="the CSV to write (default: predictions.csv here)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: data.batch_size)")
    parser.add_argument("--num-workers", type=int, help="decoding processes (default: data.num_workers)")
    parser.add_argument("--accelerator", help="cpu, gpu, mps, auto (default: the Trainer's, auto)")
    return parser


def main(args: Namespace) -> None:
    given = vars(args)  # only what was given: the classes' own defaults for the rest
    with boundary():
        model, settings = load_model(args.ckpt)
        loader = {k: given[k] for k in ("batch_size", "num_workers") if k in given}
        data = CIFARDataModule(**settings, **loader, predict_dir=list(args.inputs))
        writer = PredictionWriter(**{k: given[k] for k in ["output"] if k in given})
        accelerator = {k: given[k] for k in ["accelerator"] if k in given}
        check_accelerator(given.get("accelerator"), "--accelerator")
        try:  # one process (a CSV in input order, no launcher) that writes nothing else
            trainer = L.Trainer(
                **accelerator, devices=1, logger=False, callbacks=[writer], enable_progress_bar=False
            )
        except ValueError as err:  # an accelerator Lightning does not know
            raise UserError(f"{err}: see `predict.py --help`.") from None
        trainer.predict(model, datamodule=data, return_predictions=False)
    if writer.skipped:
        sys.exit(SKIPPED_EXIT)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
