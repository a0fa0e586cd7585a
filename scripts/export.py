"""Export a checkpoint for deployment (ONNX or TorchScript), then check it agrees with the checkpoint.

    python scripts/export.py lightning_logs/version_0/checkpoints/last.ckpt --format onnx
    python scripts/export.py last.ckpt --format torchscript --output model.pt --check-images photos/

The exported model takes raw uint8 RGB images, NCHW (N, 3, 32, 32), any N, and returns class
probabilities (N, C): pixels / 255, the training normalization (when the model was trained with
it) and softmax are inside (lit_cifar.inference.Deployable). Class names ride along: ONNX
metadata "class_names" (JSON), TorchScript attribute `class_names`.
It is written to <ckpt stem>.onnx / .pt beside the checkpoint unless --output says otherwise,
only once its probabilities match the checkpoint's within 1e-4 (max abs difference) on the
images of --check-images, or on random images; otherwise nothing is written and the exit status is 1.
"""

import copy
import importlib.util
import json
import os
import sys
import warnings
import zipfile
from argparse import SUPPRESS, Namespace
from pathlib import Path

import torch

from lit_cifar.data import CIFARDataModule
from lit_cifar.errors import ArgumentParser, UserError, boundary
from lit_cifar.guards import check_output
from lit_cifar.inference import Deployable, find_images, load_model, read_image

SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4  # max abs difference of probabilities, exported vs checkpoint
RANDOM_IMAGES = 37  # checked when no --check-images: an odd batch, unlike the export's example of 2


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0], argument_default=SUPPRESS)
    parser.add_argument("ckpt", help="a checkpoint written by training (.ckpt)")
    parser.add_argument("--format", required=True, choices=list(SUFFIXES))
    parser.add_argument("--output", help="where to write (default: beside the checkpoint, same stem)")
    parser.add_argument("--check-images", metavar="DIR", help="images to compare on (default: random)")
    return parser


def export_onnx(model: Deployable, path: Path) -> None:
    example = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            verbose=False,
        )
    except ImportError as err:
        raise UserError(
            f"ONNX export needs onnx and onnxscript ({err}): pip install -e '.[export]'."
        ) from None
    program.model.metadata_props["class_names"] = json.dumps(model.class_names)
    program.save(path, external_data=False)  # one self-contained file


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor | None:
    if importlib.util.find_spec("onnxruntime") is None:
        import onnx

        onnx.checker.check_model(str(path))
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def export_torchscript(model: Deployable, path: Path) -> None:
    with warnings.catch_warnings():  # deprecated in torch 2.14, still what C++ and mobile runtimes load
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)
        torch.jit.script(model).save(str(path))


def run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(images)


EXPORT = {"onnx": (export_onnx, run_onnx), "torchscript": (export_torchscript, run_torchscript)}


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
    return torch.stack(images), f"{folder}"


def is_export(path: Path) -> bool:
    """Whether `path` is an earlier export (which a re-run replaces): ONNX or TorchScript by content."""
    if path.suffix == SUFFIXES["torchscript"]:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    with open(path, "rb") as f:  # an ONNX ModelProto starts with field 1, ir_version (a varint)
        return path.suffix == SUFFIXES["onnx"] and f.read(1) == b"\x08"


def main(args: Namespace) -> None:
    given = vars(args)
    with boundary():
        output = Path(given.get("output") or Path(args.ckpt).with_suffix(SUFFIXES[args.format]))
        check_output(output, is_export, "--output")
        model, settings = load_model(args.ckpt)
        data = CIFARDataModule(**settings)
        net = copy.deepcopy(model.net).to(memory_format=torch.contiguous_format)
        mean_std = data.mean_std if data.hparams.normalize else None
        deployable = Deployable(net, model.class_names, mean_std, model.hparams.get("flip_tta", False))
        images, source = check_images(given.get("check_images"))
        with torch.no_grad():  # the checkpoint's own path: the DataModule's preparation, predict_step
            expected = model.predict_step(data.to_float(images), 0)
        output.parent.mkdir(parents=True, exist_ok=True)
        export, run = EXPORT[args.format]
        # Written beside the target, renamed into place only once it passed: never a half or bad file.
        tmp = output.with_name(f".{output.stem}.{os.getpid()}.tmp{output.suffix}")
        try:
            export(deployable.eval(), tmp)
            got = run(tmp, images)
            if got is None:
                print(
                    "onnxruntime is not installed: checked the ONNX graph only (pip install -e '.[export]')"
                )
            else:
                single = run(tmp, images[:1])  # batch size 1 works too
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
    print(
        f"wrote {output} (input: uint8 images (N, 3, 32, 32); output: probabilities (N, {len(model.class_names)}))"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
