"""Pictures: feature maps as channel grids (scripts/tour.py, the dashboard), and matplotlib figures drawn
off-screen by the Agg backend (no pyplot, no window): labelled images, the confusion matrix."""

import math

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F
from torchvision.utils import make_grid


def layer_outputs(net: nn.Sequential, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run `net` layer by layer: ({"<i>_<layer>": output of each conv/pooling layer}, final output)."""
    maps = {}
    for i, layer in enumerate(net):
        x = layer(x)
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            maps[f"{i}_{type(layer).__name__.lower()}"] = x
    return maps, x


def channel_grid(fmap: torch.Tensor, max_channels: int = 16, size: int = 32) -> torch.Tensor:
    """(N, C, H, W) feature maps -> one (3, H', W') image in [0, 1]: a row per image, a gray tile per
    channel, each scaled to its own min..max; maps smaller than `size` enlarged (nearest) to it."""
    fmap = fmap[:, :max_channels].detach().float().cpu()
    n, c, h, w = fmap.shape
    tiles = F.interpolate(fmap.reshape(n * c, 1, h, w), scale_factor=max(1, size // h), mode="nearest")
    return make_grid(tiles, nrow=c, padding=2, normalize=True, scale_each=True, pad_value=1.0)


def image_figure(images, labels, preds, class_names: list[str], title: str) -> np.ndarray:
    """(N, 3, H, W) [0, 1] images on one canvas, each under `true` / `→ predicted` (green right, red wrong)."""
    n, _, h, w = images.shape
    cols = min(n, math.ceil(math.sqrt(2 * n)))  # about twice as wide as high, like a TensorBoard card
    band, pad = h * 2 // 3, 2  # room for the two label lines above each image, in image pixels
    canvas = torch.ones(3, -(-n // cols) * (h + band), cols * (w + pad))
    height = canvas.shape[1] / 36 + 0.25  # inches: a 32-pixel image ~0.9"
    figure = Figure(figsize=(canvas.shape[2] / 36, height), dpi=80)
    figure.suptitle(f"{title}: true label → predicted", fontsize=9, y=1 - 0.05 / height)
    ax = figure.add_axes((0, 0, 1, 1 - 0.25 / height))
    ax.axis("off")
    for i in range(n):
        top, left = (i // cols) * (h + band) + band, (i % cols) * (w + pad)
        canvas[:, top : top + h, left : left + w] = images[i]
        true, pred = class_names[int(labels[i])], class_names[int(preds[i])]
        color = "green" if true == pred else "red"
        ax.text(left + w / 2, top - 1, f"{true}\n→ {pred}", ha="center", va="bottom", fontsize=8, color=color)
    ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
    return _render(figure)


def confusion_figure(matrix: torch.Tensor, class_names: list[str], title: str) -> np.ndarray:
    """(C, C) counts -> a figure: rows normalized to 1 (color), per-class accuracy beside the rows."""
    counts = matrix.double()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)  # the diagonal: per-class accuracy (recall)
    c, small = len(class_names), len(class_names) <= 20  # names and counts readable up to about 20 classes
    figure = Figure(figsize=(6.4, 5.4) if small else (8, 8), dpi=80)
    # fixed margins (room for the class names) instead of tight_layout, which draws everything twice
    ax = figure.add_axes((0.2, 0.17, 0.78, 0.76) if small else (0.06, 0.06, 0.9, 0.88))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_title(f"{title}   accuracy {counts.diag().sum() / counts.sum():.3f}", fontsize=9)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true (per-class accuracy)", fontsize=8)
    if small:
        ax.set_xticks(range(c), class_names, rotation=45, ha="right", fontsize=7)
        seen = (counts.sum(1) > 0).tolist()
        accuracy = [f"{a:.0%}" if s else "-" for a, s in zip(rates.diag().tolist(), seen, strict=True)]
        ax.set_yticks(range(c), [f"{n} {a}" for n, a in zip(class_names, accuracy, strict=True)], fontsize=7)
        # Counts on the diagonal and in each row's most frequent confusion only: every text is drawn.
        off_diagonal = rates - torch.eye(c, dtype=rates.dtype)
        for i, j in [(i, i) for i in range(c)] + list(enumerate(off_diagonal.argmax(1).tolist())):
            if counts[i, j] > 0:
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    return _render(figure)


def _render(figure: Figure) -> np.ndarray:
    """A matplotlib figure -> (H, W, 3) uint8."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
