"""The seed's component tour: CIFAR-10 images through each layer kind, written to TensorBoard,
and the seed's loss examples printed with their input and output shapes.

    python scripts/tour.py --data-dir data      # an image or CIFAR-10 folder (e.g. train.py's ./data)
    python scripts/tour.py                      # synthetic images: no data needed
    tensorboard --logdir runs/tour              # then open the Images tab

Images are [0, 1] pixels, as the seed's ToTensor gave them. Multi-channel outputs are shown as
per-channel grids (one row per image, one gray tile per channel), never reshaped into fake RGB.
"""

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.tensorboard import SummaryWriter

from lit_cifar import build_net, sources
from lit_cifar.cli import quiet_upstream_notices
from lit_cifar.data import CIFAR10_CLASSES
from lit_cifar.errors import ArgumentParser, UserError, boundary
from lit_cifar.figures import channel_grid, layer_outputs


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="an image folder or a CIFAR-10 folder (default: synthetic images)")
    parser.add_argument("--log-dir", default="runs/tour", help="TensorBoard folder (default: runs/tour)")
    parser.add_argument("--num-images", type=int, default=8, help="images to show (default: 8)")
    return parser


def load_images(data_dir: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(n, 3, 32, 32) float [0, 1] images, (n,) labels and the class names."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(
            f"{data_dir} is not a folder: give an image folder or a CIFAR-10 folder, or leave out "
            f"--data-dir for synthetic images."
        )
    if data_dir is None:  # synthetic: smooth random colour blobs, so the layers have something to show
        g = torch.Generator().manual_seed(0)
        x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear")
        return x, torch.randint(0, 10, (n,), generator=g), CIFAR10_CLASSES
    sources.prepare(data_dir, "cifar10", download=False, checksums=sources.expected_md5s("cifar10"))
    loaded = sources.load(data_dir)
    x, y = loaded["train"]
    pick = torch.linspace(0, len(y) - 1, n).long()  # spread over the set: image folders are sorted by class
    return x[pick].float() / 255, y[pick], loaded["classes"]


def shapes(name: str, inputs: torch.Tensor, output: torch.Tensor) -> None:
    print(f"{name:<44} {str(tuple(inputs.shape)):>16} -> {tuple(output.shape)}")


def layer_tour(writer: SummaryWriter, x: torch.Tensor, num_classes: int) -> None:
    """Each layer kind of the seed on the images x: (B, 3, 32, 32) in [0, 1]."""
    writer.add_images("tour/0_input", x, 0)
    with torch.no_grad():
        conv = nn.Conv2d(3, 6, kernel_size=3)  # (B, 3, 32, 32) -> (B, 6, 30, 30)
        y = conv(x)
        shapes("Conv2d(3, 6, kernel_size=3)", x, y)
        writer.add_image("tour/1_conv2d", channel_grid(y, max_channels=6), 0)

        pool = nn.MaxPool2d(kernel_size=3, ceil_mode=True)  # (B, 3, 32, 32) -> (B, 3, 11, 11): still RGB
        y = pool(x)
        shapes("MaxPool2d(kernel_size=3, ceil_mode=True)", x, y)
        writer.add_images("tour/2_maxpool2d", y, 0)

        centered = x * 2 - 1  # [-1, 1], so the activations have negatives to act on
        for i, act in enumerate((nn.ReLU(), nn.Tanh()), start=3):
            y = act(centered)
            shapes(f"{act} on 2x - 1", centered, y)
            writer.add_images(f"tour/{i}_{type(act).__name__.lower()}", (y + 1) / 2 if i == 4 else y, 0)

        linear = nn.Linear(3 * 32 * 32, num_classes)  # (B, 3072) -> (B, 10): one row of scores per image
        flat = torch.flatten(x, 1)
        y = linear(flat)
        shapes(f"Linear({flat.shape[1]}, {num_classes}) on flattened images", flat, y)
        heat = (y - y.min()) / (y.max() - y.min() + 1e-8)
        writer.add_image("tour/5_linear", F.interpolate(heat[None, None], scale_factor=16)[0], 0)

        net = build_net("seed", num_classes)  # the whole seed Sequential, untrained
        maps, logits = layer_outputs(net, x)
        for name, fmap in maps.items():
            shapes(f"seed net, after layer {name}", x, fmap)
            writer.add_image(f"tour/6_seed_net/{name}", channel_grid(fmap), 0)
        shapes("seed net (whole)", x, logits)
        writer.add_graph(net, x)


def loss_tour(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """The seed's loss examples, then the seed net's loss on the images, each printed as: loss,
    input and target shapes, output shape, value."""
    output = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 3)  # the seed's (1, 1, 3) tensors
    target = torch.tensor([1.0, 3.0, 5.0]).reshape(1, 1, 3)
    examples = [
        ("L1Loss()", nn.L1Loss(), output, target),  # (0 + 1 + 2) / 3 = 1.0
        ("MSELoss()", nn.MSELoss(), output, target),  # (0 + 1 + 4) / 3 = 1.6667
        # one image, three classes: logits (1, 3), target class (1,): -0.8 + log(e^0.1 + e^0.8 + e^0.2)
        (
            "CrossEntropyLoss(), 3 classes",
            nn.CrossEntropyLoss(),
            torch.tensor([[0.1, 0.8, 0.2]]),
            torch.tensor([1]),
        ),
        ("CrossEntropyLoss(), seed net on the images", nn.CrossEntropyLoss(), logits, labels),
    ]
    for name, loss, inp, tgt in examples:
        out = loss(inp, tgt)
        print(
            f"{name:<44} input {tuple(inp.shape)} target {tuple(tgt.shape)} -> {tuple(out.shape)} = {out:.4f}"
        )


def main(args: argparse.Namespace) -> None:
    with boundary():
        if args.num_images < 1:
            raise UserError(f"--num-images must be at least 1, got {args.num_images}.")
        quiet_upstream_notices()  # add_graph's torch.jit deprecation notices
        torch.manual_seed(0)  # the layers' random weights: the same pictures every run
        x, labels, classes = load_images(args.data_dir, args.num_images)
        print(f"{len(x)} images from {args.data_dir or 'synthetic data'}: {[classes[i] for i in labels]}\n")
        print(f"{'layer':<44} {'input':>16}    output")
        with SummaryWriter(args.log_dir) as writer:
            layer_tour(writer, x, len(classes))
        print(f"\n{'loss':<44} shapes and value")
        with torch.no_grad():
            loss_tour(build_net("seed", len(classes))(x), labels)
        print(f"\nwritten to {args.log_dir}: tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
