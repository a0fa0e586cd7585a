"""TODO docstring: lit_cifar/export.py."""

import importlib.util
import json
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lit_cifar.errors import UserError


class Deployable(nn.Module):
    """The network with its input preparation: uint8 RGB images (N, 3, 32, 32) -> probabilities (N, C).

    Exactly what the checkpoint computes in `predict`: pixels / 255, the training normalization
    (when it was on), the net (averaged with the mirror image's logits when `flip_tta`), softmax.
    """

    class_names: list[str]

    def __init__(
        self,
        net: nn.Module,
        class_names: list[str],
        mean_std: tuple[Sequence[float], Sequence[float]] | None,
        flip_tta: bool = False,
    ) -> None:
        super().__init__()
        self.net, self.flip_tta = net, flip_tta
        self.class_names = list(class_names)
        mean, std = mean_std if mean_std is not None else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255 - self.mean) / self.std  # (N, 3, 32, 32) as in training
        logits = self.net(x)  # (N, C)
        if self.flip_tta:
            logits = (logits + self.net(x.flip(3))) / 2
        return logits.softmax(dim=-1)


SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}


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


def is_export(path: Path) -> bool:
    """Whether `path` is an earlier export (which a re-run replaces): ONNX or TorchScript by content."""
    if path.suffix == SUFFIXES["torchscript"]:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    with open(path, "rb") as f:  # an ONNX ModelProto starts with field 1, ir_version (a varint)
        return path.suffix == SUFFIXES["onnx"] and f.read(1) == b"\x08"
