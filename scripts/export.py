"""Export a checkpoint for deployment (ONNX or TorchScript), then check it agrees with the checkpoint.

    python scripts/export.py lightning_logs/version_0/checkpoints/last.ckpt --format onnx
    python scripts/export.py last.ckpt --format torchscript --output model.pt --check-images photos/

The exported model (lit_cifar.export.Deployable) takes uint8 RGB images (N, 3, 32, 32) and returns
probabilities (N, C); its class names ride along. It is written (beside the checkpoint unless --output)
only once it agrees with the checkpoint within 1e-4 on --check-images or random images; else exit 1."""

import os
import sys
from argparse import SUPPRESS, Namespace
from pathlib import Path

import torch

from lit_cifar.checkpoints import load_model
from lit_cifar.cli import quiet_upstream_notices
from lit_cifar.data import CIFARDataModule
from lit_cifar.errors import ArgumentParser, UserError, boundary, check_output
from lit_cifar.export import SUFFIXES, Deployable, export, is_export, run
from lit_cifar.images import find_images, read_image

TOLERANCE = 1e-4  # max abs difference of probabilities, exported vs checkpoint
RANDOM_IMAGES = 37  # checked when no --check-images: an odd batch, unlike the export's example of 2


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0], argument_default=SUPPRESS)
    parser.add_argument("ckpt", help="a checkpoint written by training (.ckpt)")
    parser.add_argument("--format", required=True, choices=list(SUFFIXES))
    parser.add_argument("--output", help="where to write (default: beside the checkpoint, same stem)")
    parser.add_argument("--check-images", metavar="DIR", help="images to compare on (default: random)")
    return parser


def check_images(folder: str | None) -> tuple[torch.Tensor, str]:
    """uint8 (N, 3, 32, 32) images to compare on, and what they are."""
    if folder is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (RANDOM_IMAGES, 3, 32, 32), generator=g, dtype=torch.uint8), "random"
    images = []
    for path in find_images(folder):
        try:
            images.append(read_image(path))
        except Exception as err:  # noqa: BLE001 - decoders raise many types; all mean a bad file
            print(f"skipped unreadable {path}: {err}", file=sys.stderr)
    if not images:
        raise UserError(f"no readable images in {folder} to check the export on.")
    return torch.stack(images), folder


def main(args: Namespace) -> None:
    given = vars(args)
    with boundary():
        quiet_upstream_notices()  # torch.jit's deprecation notices
        output = Path(given.get("output") or Path(args.ckpt).with_suffix(SUFFIXES[args.format]))
        check_output(output, is_export, "--output")
        model, settings = load_model(args.ckpt)
        data = CIFARDataModule(**settings)
        deployable = Deployable(model, data.mean_std if data.hparams.normalize else None).eval()
        images, source = check_images(given.get("check_images"))
        with torch.no_grad():  # the checkpoint's own path: the DataModule's preparation, predict_step
            expected = model.predict_step(data.to_float(images), 0)
        output.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target, renamed into place only once it passed: never a half or bad file.
        tmp = output.with_name(f".{output.stem}.{os.getpid()}.tmp{output.suffix}")
        try:
            export(deployable, args.format, tmp)
            got, single = run(args.format, tmp, images), run(args.format, tmp, images[:1])  # any N works
            diff = max((got - expected).abs().max().item(), (single - expected[:1]).abs().max().item())
            print(
                f"max abs difference of probabilities, {args.format} vs checkpoint, on {len(images)} "
                f"images ({source}): {diff:.2e} (tolerance {TOLERANCE:.0e})"
            )
            if not diff <= TOLERANCE:
                raise UserError(
                    f"the exported model disagrees with the checkpoint ({diff:.2e} > {TOLERANCE:.0e}): "
                    f"nothing was written."
                )
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)
    n = len(model.class_names)
    print(f"wrote {output} (input: uint8 images (N, 3, 32, 32); output: probabilities (N, {n}))")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
