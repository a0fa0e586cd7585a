"""The seed's component tour: images through each layer kind, written to TensorBoard, and the seed's
loss examples, each printed with its input and output shapes.

    python scripts/tour.py --data-dir data    # an image or CIFAR-10 folder; without it, synthetic images
    tensorboard --logdir runs/tour            # the Images tab: multi-channel outputs as per-channel grids

Images are [0, 1] pixels, as the seed's ToTensor gave them; channels are never reshaped into fake RGB.
"""

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.tensorboard import SummaryWriter

from lit_cifar import CIFARDataModule, build_net
from lit_cifar.cli import quiet_upstream_notices
from lit_cifar.data import CIFAR10_CLASSES
from lit_cifar.errors import ArgumentParser, UserError, boundary, check_number
from lit_cifar.figures import channel_grid, layer_outputs


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="an image folder or a CIFAR-10 folder (default: synthetic images)")
    parser.add_argument("--log-dir", default="runs/tour", help="TensorBoard folder (default: runs/tour)")
    parser.add_argument("--num-images", type=int, default=8, help="images to show (default: 8)")
    return parser


def load_images(data_dir: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(n, 3, 32, 32) float [0, 1] images, (n,) labels and the class names."""
    if data_dir is None:  # synthetic: smooth random colour blobs, so the layers have something to show
        g = torch.Generator().manual_seed(0)
        x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear")
        return x, torch.randint(0, 10, (n,), generator=g), CIFAR10_CLASSES
    if not Path(data_dir).is_dir():
        raise UserError(
            f"{data_dir} is not a folder: give an image folder or a CIFAR-10 folder, or leave out "
            f"--data-dir for synthetic images."
        )
    data = CIFARDataModule(data_dir, download=False)
    data.prepare_data()
    data.setup("fit")
    x, y = data.data["train"]
    pick = torch.linspace(0, len(y) - 1, n).long()  # spread over the set: image folders are sorted by class
    return x[pick].float() / 255, y[pick], data.classes


def layer_tour(writer: SummaryWriter, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each layer kind of the seed on the images x, (B, 3, 32, 32) in [0, 1]; returns the seed net's logits."""

    def show(name: str, inputs: torch.Tensor, output: torch.Tensor, tag: str = "", picture=None) -> None:
        print(f"{name:<44} {str(tuple(inputs.shape)):>16} -> {tuple(output.shape)}")
        if tag:  # picture: (N, 3 or 1, H, W) in [0, 1]
            writer.add_images(f"tour/{tag}", picture, 0)

    writer.add_images("tour/0_input", x, 0)
    y = nn.Conv2d(3, 6, kernel_size=3)(x)  # (B, 6, 30, 30): six channels, shown as a grid
    show("Conv2d(3, 6, kernel_size=3)", x, y, "1_conv2d", channel_grid(y, max_channels=6)[None])
    y = nn.MaxPool2d(kernel_size=3, ceil_mode=True)(x)  # (B, 3, 11, 11): still RGB
    show("MaxPool2d(kernel_size=3, ceil_mode=True)", x, y, "2_maxpool2d", y)
    centered = x * 2 - 1  # [-1, 1], so the activations have negatives to act on
    y = nn.ReLU()(centered)
    show("ReLU() on 2x - 1", centered, y, "3_relu", y)
    y = nn.Tanh()(centered)
    show("Tanh() on 2x - 1", centered, y, "4_tanh", (y + 1) / 2)
    flat = torch.flatten(x, 1)
    y = nn.Linear(3 * 32 * 32, num_classes)(flat)  # (B, 3072) -> (B, 10): one row of scores per image
    heat = F.interpolate(((y - y.min()) / (y.max() - y.min() + 1e-8))[None, None], scale_factor=16)
    show(f"Linear(3072, {num_classes}) on flattened images", flat, y, "5_linear", heat)
    net = build_net("seed", num_classes)  # the whole seed Sequential, untrained
    maps, logits = layer_outputs(net, x)
    for name, fmap in maps.items():
        show(f"seed net, after layer {name}", x, fmap, f"6_seed_net/{name}", channel_grid(fmap)[None])
    show("seed net (whole)", x, logits)
    writer.add_graph(net, x)
    return logits


def loss_tour(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """The seed's loss examples, then the seed net's loss on the images: input and target shapes, value."""
    output, target = torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[1.0, 3.0, 5.0]]])  # (1, 1, 3) each
    ce = nn.CrossEntropyLoss()
    examples = [
        ("L1Loss()", nn.L1Loss(), output, target),  # (0 + 1 + 2) / 3 = 1.0
        ("MSELoss()", nn.MSELoss(), output, target),  # (0 + 1 + 4) / 3 = 1.6667
        # one image, three classes: logits (1, 3), target class (1,): -0.8 + log(e^0.1 + e^0.8 + e^0.2)
        ("CrossEntropyLoss(), 3 classes", ce, torch.tensor([[0.1, 0.8, 0.2]]), torch.tensor([1])),
        ("CrossEntropyLoss(), seed net on the images", ce, logits, labels),
    ]
    for name, loss, inp, tgt in examples:
        out = loss(inp, tgt)
        print(
            f"{name:<44} input {tuple(inp.shape)} target {tuple(tgt.shape)} -> {tuple(out.shape)} = {out:.4f}"
        )


@torch.no_grad()
def main(args: argparse.Namespace) -> None:
    with boundary():
        check_number("--num-images", args.num_images, 1)
        quiet_upstream_notices()  # add_graph's torch.jit deprecation notices
        torch.manual_seed(0)  # the layers' random weights: the same pictures every run
        x, labels, classes = load_images(args.data_dir, args.num_images)
        print(f"{len(x)} images from {args.data_dir or 'synthetic data'}: {[classes[i] for i in labels]}\n")
        print(f"{'layer':<44} {'input':>16}    output")
        with SummaryWriter(args.log_dir) as writer:
            logits = layer_tour(writer, x, len(classes))
        print(f"\n{'loss':<44} shapes and value")
        loss_tour(logits, labels)
        print(f"\nwritten to {args.log_dir}: tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
