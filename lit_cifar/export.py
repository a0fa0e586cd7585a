"""Deployable, the network with its input preparation, and its export to ONNX or TorchScript.
scripts/export.py writes an export only once it agrees with the checkpoint:

    python scripts/export.py last.ckpt --format onnx
"""

import copy
import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from lit_cifar.errors import UserError
from lit_cifar.module import CIFARClassifier

SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}


class Deployable(nn.Module):
    """The network with its input preparation: uint8 RGB images (N, 3, 32, 32) -> probabilities (N, C).

    Exactly what the checkpoint computes in `predict`: pixels / 255, the training normalization
    (when it was on), the net (averaged with the mirror image's logits when `flip_tta`), softmax.
    """

    class_names: list[str]

    def __init__(self, model: CIFARClassifier, mean_std: tuple | None) -> None:
        """`model`'s net (a copy, in NCHW), its class names and flip_tta; `mean_std` when it normalized."""
        super().__init__()
        self.net = copy.deepcopy(model.net).to(memory_format=torch.contiguous_format)
        self.flip_tta, self.class_names = model.hparams.flip_tta, list(model.class_names)
        mean, std = mean_std or ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255 - self.mean) / self.std  # (N, 3, 32, 32) as in training
        logits = self.net(x)  # (N, C)
        if self.flip_tta:
            logits = (logits + self.net(x.flip(3))) / 2
        return logits.softmax(dim=-1)


def export(model: Deployable, fmt: str, path: Path) -> None:
    """`model` as ONNX or TorchScript, with its class names (ONNX metadata, TorchScript attribute)."""
    if fmt == "torchscript":
        torch.jit.script(model).save(str(path))
        return
    try:
        import onnxruntime  # noqa: F401 - not for the export, but `run` checks it with onnxruntime

        program = torch.onnx.export(
            model,
            (torch.zeros(2, 3, 32, 32, dtype=torch.uint8),),
            dynamo=True,
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},  # any N
            input_names=["images"],
            output_names=["probabilities"],
            verbose=False,
        )
    except ImportError as err:
        raise UserError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({err}): pip install -e '.[export]'."
        ) from None
    program.model.metadata_props["class_names"] = json.dumps(model.class_names)
    program.save(path, external_data=False)  # one self-contained file


def run(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """The exported model at `path` on uint8 images (N, 3, 32, 32): probabilities (N, C)."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path), map_location="cpu")(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def is_export(path: Path) -> bool:
    """Whether `path` is an earlier export (which a re-run replaces): ONNX or TorchScript by content."""
    if path.suffix == SUFFIXES["torchscript"] and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    with open(path, "rb") as f:  # an ONNX ModelProto starts with field 1, ir_version (a varint)
        return path.suffix == SUFFIXES["onnx"] and f.read(1) == b"\x08"
