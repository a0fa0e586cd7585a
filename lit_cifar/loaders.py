"""TODO docstring: lit_cifar/loaders.py."""

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
    """(x, y) in a fixed order that deals the classes out in rounds: the first image of each class
    (the classes in a random order), then the second of each... so any prefix of an evaluation
    split, such as `limit_val_batches` or `fast_dev_run` read, covers the classes."""
    by_class = torch.argsort(y, stable=True)
    counts = torch.bincount(y)
    rank_in_class = torch.empty_like(y)
    rank_in_class[by_class] = torch.arange(len(y)) - torch.repeat_interleave(
        counts.cumsum(0) - counts, counts
    )
    shuffle = torch.rand(len(y), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    order = (rank_in_class + shuffle).argsort()
    return x[order], y[order]


def random_crop_flip(
    x: torch.Tensor, padding: int, padding_mode: str = "constant", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image random crop of a padded batch and random horizontal flip, on x's device.

    The same distribution as torchvision's RandomCrop(32, padding, padding_mode=...) +
    RandomHorizontalFlip(), drawn for each image. No padded copy is made: each output pixel's
    source pixel is computed (shifted, mirrored for the flip, reflected or zeroed at the border)
    and the whole batch is one gather. x: (B, C, H, W), any dtype. `generator` (on x's device)
    draws the crops and flips; None: the global random state.
    """
    b, c, h, w = x.shape
    dev = x.device
    shift = partial(torch.randint, 0, 2 * padding + 1, (b, 1, 1, 1), generator=generator, device=dev)
    dy, dx = shift() - padding, shift() - padding  # shifts in [-p, p]
    flip = torch.rand(b, 1, 1, 1, generator=generator, device=dev) < 0.5
    j = torch.arange(w, device=dev).view(1, 1, 1, w)
    rows = dy + torch.arange(h, device=dev).view(1, 1, h, 1)  # (B, 1, H, 1) source row of each output row
    cols = dx + torch.where(flip, w - 1 - j, j)  # (B, 1, 1, W): a flipped image reads its crop backwards
    if padding_mode == "reflect":  # -1 -> 1, h -> h - 2 (no edge repeat, as torch and torchvision)
        rows = torch.where(rows < 0, -rows, torch.where(rows > h - 1, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols > w - 1, 2 * (w - 1) - cols, cols))
        inside = None
    else:  # constant: read any pixel, then zero those that fall in the padding
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # (B, 1, H, W)
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    index = (rows * w + cols).view(b, 1, h * w).expand(b, c, h * w)  # flat source pixel, every channel
    out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return out if inside is None else out * inside


class _Samples(Dataset):
    """The standard path: one (image, label) at a time, with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), self.labels[i]


class TensorLoader:
    """Batches sliced from tensors that already sit on the training device, augmented there.

    Shuffled, each epoch is one permutation seeded by seed + epoch (torch's DistributedSampler's
    order), the same on every rank; rank r takes every world_size-th index. `drop_last` drops the
    n % world_size images left over, so ranks train on equal shards and none waits at the last step;
    unshuffled and without it, every image comes once over all ranks (evaluation).

    `augment(images, generator)` transforms each batch with a generator on the data's device seeded
    by (seed, epoch, batch index, rank): no global random state is read or changed, each rank draws
    its own crops and flips, and a batch is the same whenever it is drawn. So the loader's place
    (`state_dict`: epoch, batches handed out) is all a resumed run needs to continue with the
    batches, crops and flips an uninterrupted one would have had. It continues at the right batch
    because Lightning's training fetcher asks for a batch only when it trains on it (it reads ahead
    only for loaders without a length): a checkpoint written after step k continues at batch k+1.
    """

    def __init__(
        self,
        images,
        labels,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        epoch: Callable[[], int] | None = None,
    ) -> None:
        """`drop_last` defaults to `shuffle`; `epoch` says which epoch a pass is (the trainer's
        current_epoch, so a loader rebuilt by reload_dataloaders_every_n_epochs goes on with the
        next epoch's order); None: passes count 0, 1, 2..."""
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = shuffle if drop_last is None else drop_last
        self.augment, self._epoch = augment, epoch
        self.epoch, self.batches_done = -1, 0  # the first pass is epoch 0
        self._resume: dict | None = None  # a state_dict() the next pass continues from
        self._generator = torch.Generator(images.device) if augment is not None else None

    def _order(self) -> torch.Tensor:
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            if self.shuffle
            else torch.arange(n)
        )
        if self.drop_last:
            order = order[: n - n % self.world_size]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self.labels)
        count = (
            (n - n % self.world_size) // self.world_size
            if self.drop_last
            else len(range(self.rank, n, self.world_size))
        )
        return math.ceil(count / self.batch_size)

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
        order = self._order().to(self.labels.device)
        for start in range(self.batches_done * self.batch_size, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            if self.augment is not None:
                self._generator.manual_seed(_mix(self.seed, self.epoch, self.batches_done, self.rank))
                x = self.augment(x, generator=self._generator)
            self.batches_done += 1
            yield x, self.labels[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state  # applied when the next pass starts


def _mix(*keys: int) -> int:
    """One 64-bit seed from several numbers (numpy's SeedSequence): nearby keys, unrelated streams."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])
