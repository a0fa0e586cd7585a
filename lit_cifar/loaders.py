"""The data's plain-torch parts: the train/val split, the evaluation order, crop+flip of a whole batch on
its device, and TensorLoader (the fast path's loader: batches sliced from tensors on the training device).

    python -c "from lit_cifar.loaders import split_indices; print(split_indices(10, 0.2, seed=0))"
"""

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch.utils.data import Dataset

from lit_cifar.errors import UserError


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded, disjoint (train, val) split of range(n): the same on every machine and rank."""
    n_val = round(val_size * n) if val_size < 1 else int(val_size)
    if not 1 <= n_val < n:
        raise UserError(
            f"val_size={val_size} holds out {n_val} of {n} training images: it must leave at least one "
            f"image for each of train and val (use a fraction in (0, 1) or a count below {n})."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def mix_classes(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) dealing the classes out in rounds: each class's first image (classes in a random order), then
    each one's second... so any prefix (`limit_val_batches`, `fast_dev_run`) covers the classes."""
    counts = torch.bincount(y)
    rank_in_class = torch.empty_like(y)
    rank_in_class[y.argsort(stable=True)] = torch.arange(len(y)) - (
        counts.cumsum(0) - counts
    ).repeat_interleave(counts)
    shuffle = torch.rand(len(y), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    order = (rank_in_class + shuffle).argsort()
    return x[order], y[order]


def random_crop_flip(
    x: torch.Tensor, padding: int, padding_mode: str = "constant", generator: torch.Generator | None = None
) -> torch.Tensor:
    """torchvision's RandomCrop(32, padding, padding_mode=...) + RandomHorizontalFlip(), drawn per image, for
    a whole batch x (B, C, H, W) of any dtype on its device, drawing from `generator` (None: global state).
    No padded copy: each output pixel's source (shifted, mirrored, reflected or zeroed) is gathered at once."""
    b, c, h, w = x.shape
    dev = x.device
    shift = partial(torch.randint, 0, 2 * padding + 1, (b, 1, 1, 1), generator=generator, device=dev)
    dy, dx = shift() - padding, shift() - padding  # shifts in [-p, p]
    flip = torch.rand(b, 1, 1, 1, generator=generator, device=dev) < 0.5
    j = torch.arange(w, device=dev).view(1, 1, 1, w)
    rows = dy + torch.arange(h, device=dev).view(1, 1, h, 1)  # (B, 1, H, 1) source row of each output row
    cols = dx + torch.where(flip, w - 1 - j, j)  # (B, 1, 1, W): a flipped image reads its crop backwards
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # (B, 1, H, W): not in the padding
    if padding_mode == "reflect":  # -1 -> 1, h -> h - 2 (no edge repeat, as torch and torchvision)
        rows = torch.where(rows < 0, -rows, torch.where(rows > h - 1, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols > w - 1, 2 * (w - 1) - cols, cols))
    rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)  # constant: any pixel, zeroed below
    index = (rows * w + cols).view(b, 1, h * w).expand(b, c, h * w)  # flat source pixel, every channel
    out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return out if padding_mode == "reflect" else out * inside


class Samples(Dataset):
    """The standard path's data set: (image, label) pairs, each image through `transform` (in the workers)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


class TensorLoader:
    """Batches sliced from tensors on the training device, augmented there (the fast path).

    Shuffled, epoch e is one permutation seeded by seed + e (DistributedSampler's order), the same on every
    rank; rank r takes every world_size-th index, `drop_last` (default: `shuffle`) dropping the n % world_size
    left over so no rank waits at the last step. `augment(images, generator)` draws from a generator seeded
    by (seed, epoch, batch, rank), never the global state: a batch is the same whenever it is drawn, so
    `state_dict` (epoch, batches handed out) is all a resumed run needs (Lightning's fetcher asks for a batch
    only when it trains on it). `epoch()` names each pass's epoch (the trainer's, so a reloaded loader goes
    on with the next epoch's order); None: passes count 0, 1, 2...
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        epoch: Callable[[], int] | None = None,
    ) -> None:
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.seed, self.rank, self.world_size, self.augment, self._epoch = (
            seed,
            rank,
            world_size,
            augment,
            epoch,
        )
        n = len(labels)
        self._used = n - n % world_size if (shuffle if drop_last is None else drop_last) else n  # images read
        self.epoch, self.batches_done, self._resume = -1, 0, None  # the first pass is epoch 0
        self._generator = torch.Generator(images.device) if augment is not None else None

    def __len__(self) -> int:
        return math.ceil(len(range(self.rank, self._used, self.world_size)) / self.batch_size)

    def __iter__(self):
        resume, self._resume = self._resume, None
        if self._epoch is not None:
            self.epoch = self._epoch()
        elif resume is not None:  # saved at the epoch's end: start the next
            self.epoch = resume["epoch"] + (resume["batches_done"] >= len(self))
        else:
            self.epoch += 1
        # A resumed pass continues its epoch where the checkpoint was written.
        self.batches_done = (
            resume["batches_done"] if resume is not None and resume["epoch"] == self.epoch else 0
        )
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = (
            torch.randperm(len(self.labels), generator=g) if self.shuffle else torch.arange(len(self.labels))
        )
        order = order[: self._used][self.rank :: self.world_size].to(self.labels.device)
        for start in range(self.batches_done * self.batch_size, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            if self.augment is not None:
                keys = (
                    self.seed,
                    self.epoch,
                    self.batches_done,
                    self.rank,
                )  # one 64-bit seed: unrelated streams
                self._generator.manual_seed(int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0]))
                x = self.augment(x, generator=self._generator)
            self.batches_done += 1
            yield x, self.labels[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state  # applied when the next pass starts
