"""CIFARDataModule: CIFAR-10/100 from any source in `data_dir`, split, batched, augmented per batch.

The fast path (default): the decoded uint8 images sit in one tensor on the training device;
batches are index slices of it, and crop/flip/normalize run on the whole batch there.
The standard path (`fast=False`): a DataLoader with per-sample crop/flip in worker processes.

    python -c "from lit_cifar import CIFARDataModule as D; d=D('data'); d.prepare_data(); d.setup('fit')"
"""

import math
from collections.abc import Callable
from functools import partial

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from lit_cifar import inference, sources
from lit_cifar.errors import UserError, check_number

# Per-channel statistics of the training images, over [0, 1] pixels.
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGE_SIZE = 32  # every source is made 32x32 (CIFAR's size)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class CIFARDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str = "data",
        dataset: str = "cifar10",
        download: bool = True,
        val_size: int | float = 0.1,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = True,
        normalize: bool = True,
        augment: bool = True,
        crop_padding: int = 4,
        padding_mode: str = "reflect",
        fast: bool = True,
        checksums: dict[str, str] | None = None,
        predict_dir: str | list[str] | None = None,
    ) -> None:
        """
        Args:
            data_dir: folder holding the data in any supported form (see `lit_cifar.sources`).
            dataset: cifar10 or cifar100 (for pickles, archives and downloads; an image folder
                brings its own classes).
            download: fetch the archive through torchvision when nothing is in `data_dir`.
            val_size: images held out of the training split for validation: a fraction in (0, 1)
                or a count.
            split_seed: seed of the train/val split, and nothing else: the batch order and the
                augmentation follow the training seed (`seed_everything`, `torch.manual_seed`).
            batch_size: images per batch, per device.
            num_workers: DataLoader worker processes (standard path only; the fast path needs none).
            pin_memory: page-locked host memory for faster copies to a GPU (standard path).
            normalize: subtract the data set's mean and divide by its std, per channel.
            augment: random crop (with `crop_padding` zero pixels) and horizontal flip, training only.
            crop_padding: pixels of padding around each image before the random 32x32 crop.
            padding_mode: how those pixels are filled: constant (zeros, as torchvision's
                RandomCrop) or reflect.
            fast: keep the data set as one tensor on the training device and augment per batch.
            checksums: md5 per file name, replacing the official ones for those files (for data you made).
            predict_dir: images to predict: a folder (PNG/JPEG, searched recursively), an image,
                or a list of them; any size and mode (see `lit_cifar.inference`).
        """
        super().__init__()
        if dataset not in sources.DATASETS:
            raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(sources.DATASETS)}.")
        check_number("batch_size", batch_size, 1)
        check_number("num_workers", num_workers, 0)
        check_number("split_seed", split_seed, 0)
        check_number("val_size", val_size, 0, open_low=True)
        if isinstance(val_size, float) and val_size == 1:
            raise UserError(
                "val_size 1.0 is ambiguous: as a fraction it holds out 100% of the training images "
                "(none left to train on), as a count one image. Write 1 for one image, or a fraction "
                "below 1 (e.g. 0.1) for a share."
            )
        if val_size > 1 and val_size != int(val_size):
            raise UserError(f"val_size must be a fraction in (0, 1) or a whole count, got {val_size}.")
        if padding_mode not in ("constant", "reflect"):
            raise UserError(f"padding_mode must be constant or reflect, got {padding_mode!r}.")
        check_number("crop_padding", crop_padding, 0)
        if crop_padding >= IMAGE_SIZE:
            raise UserError(
                f"crop_padding {crop_padding} does not fit {IMAGE_SIZE}x{IMAGE_SIZE} images: padding "
                f"reflects at most {IMAGE_SIZE - 1} pixels, and a wider pad lets a crop miss the image "
                f"entirely. Use 0 to {IMAGE_SIZE - 1} (the usual is 4)."
            )
        self.save_hyperparameters()
        self.data: dict[str, sources.Split | None] = {}
        self._classes: list[str] | None = None  # known for sure once setup() read the files
        self._train_loader: TensorLoader | None = None
        self._train_state: dict | None = None  # a resumed run's place in the training data
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # see normalization()

    # ------------------------------------------------------------------ what the model needs to know

    @property
    def classes(self) -> list[str]:
        if self._classes is not None:
            return self._classes
        if sources.is_image_folder(self.hparams.data_dir):
            return sources.folder_classes(self.hparams.data_dir)
        if self.hparams.dataset == "cifar10":
            return CIFAR10_CLASSES
        return sources.CIFAR100_CLASSES  # the files' own names replace these in setup()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return MEAN_STD[self.hparams.dataset]

    @property
    def has_test(self) -> bool:
        return sources.has_test(self.hparams.data_dir)

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        if self.trainer is not None and self.trainer.predicting:
            return  # prediction reads only its own images
        hp = self.hparams
        # validate and test read only their own split. fit checks (and caches) the test split too, so
        # a run that tests after training (scripts/train.py) cannot fail on its data at the end.
        stage = self.trainer.state.fn if self.trainer is not None else "fit"
        fit_splits = ["train", "test"] if sources.has_test(hp.data_dir) else ["train"]
        for split in {"validate": ["train"], "test": ["test"]}.get(stage, fit_splits):
            n = sources.prepare(hp.data_dir, hp.dataset, hp.download, hp.checksums, split)
            if split == "train":  # a bad val_size fails here, before any log is written
                split_indices(n, hp.val_size, hp.split_seed)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:  # the constants reach the device now, before any step
            self.normalization(self.trainer.strategy.root_device)
        # Only the split this stage reads is decoded: testing never touches train/ (val is cut from train).
        split = "test" if stage == "test" else "train"
        if stage == "predict" or split in self.data:
            return
        hp = self.hparams
        loaded = sources.load(hp.data_dir, hp.dataset, hp.checksums, splits=(split,))
        self._classes = loaded["classes"]
        if split == "test":
            self.data["test"] = mix_classes(*loaded["test"]) if loaded["test"] is not None else None
            return
        x, y = loaded["train"]
        train_idx, val_idx = split_indices(len(y), hp.val_size, hp.split_seed)
        self.data.update(train=(x[train_idx], y[train_idx]), val=mix_classes(x[val_idx], y[val_idx]))

    # The training loader's place is kept with the DataModule's state too: Lightning restores that
    # before anything builds a loader. (It restores a loader's own state only when it builds the
    # loader after the checkpoint was read, which a schedule asking estimated_stepping_batches in
    # configure_optimizers prevents.)
    def state_dict(self) -> dict:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader else {}

    def load_state_dict(self, state: dict) -> None:
        self._train_state = state.get("train_loader")

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        if self.data.get("test") is None:
            raise UserError(
                f"{self.hparams.data_dir} has no test split: add test/<class>/ images (or use the "
                f"CIFAR pickles, which include one), or run `validate` instead."
            )
        return self._loader("test")

    def predict_dataloader(self):
        if self.hparams.predict_dir is None:
            raise UserError("nothing to predict: give images with --data.predict_dir FOLDER_OR_IMAGE.")
        return inference.image_loader(
            self.hparams.predict_dir, self.hparams.batch_size, self.hparams.num_workers
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # (B, 3, 32, 32) uint8 on the device (augmented already when training) -> float32.
        # A bare tensor (images only) passes too; float input (the model summary's example) is left be.
        x, rest = (batch, None) if isinstance(batch, torch.Tensor) else (batch[0], batch[1:])
        if x.dtype != torch.uint8:
            return batch
        x = self.to_float(x)
        return x if rest is None else (x, *rest)

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 in [0, 1], normalized when `normalize` is on."""
        x = x.float().div_(255)
        if self.hparams.normalize:
            mean, std = self.normalization(x.device)
            x = x.sub_(mean).div_(std)
        return x

    def normalization(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, 1, 1) mean and std on `device`, made once per device and kept: made in every
        step, their copy to a GPU would wait for it (a host-device sync per batch)."""
        if device not in self._constants:
            self._constants[device] = tuple(
                torch.tensor(v, device=device).view(1, 3, 1, 1) for v in self.mean_std
            )
        return self._constants[device]

    # ------------------------------------------------------------------ loaders

    def _loader(self, split: str):
        x, y = self.data[split]
        trainer, train = self.trainer, split == "train"
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # Lightning turns shuffling off for overfit_batches by swapping a DataLoader's sampler; it
        # cannot do that to a TensorLoader, so the data module does it, on both paths.
        shuffle = train and not (trainer is not None and trainer.overfit_batches)
        augment = self.hparams.augment and train
        # The training seed (seed_everything's, under DDP the same on every rank) decides the batch
        # order and the augmentation; split_seed only the split.
        seed = torch.initial_seed() % 2**63
        if self.hparams.fast:
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            hp = self.hparams
            crop_flip = partial(random_crop_flip, padding=hp.crop_padding, padding_mode=hp.padding_mode)
            loader = TensorLoader(
                x.to(device),
                y.to(device),
                hp.batch_size,
                shuffle,
                seed=seed,
                rank=rank,
                world_size=world,
                drop_last=train,
                augment=crop_flip if augment else None,
                epoch=(lambda: trainer.current_epoch) if trainer is not None else None,
            )
            if train:
                self._train_loader = loader
                if self._train_state is not None:
                    loader.load_state_dict(self._train_state)
                    self._train_state = None
            return loader
        transform = v2.Compose(
            [
                v2.RandomCrop(32, self.hparams.crop_padding, padding_mode=self.hparams.padding_mode),
                v2.RandomHorizontalFlip(),
            ]
        )
        samples = _Samples(x, y, transform if augment else None)
        # The fast path's order exactly: torch's DistributedSampler permutes with seed + epoch
        # (Lightning calls its set_epoch) and gives rank r every world-th image. Unshuffled loaders
        # get Lightning's own DistributedSampler under DDP. Crops and flips come from the process's
        # random state (each worker's is seeded by Lightning from the seed, worker and rank).
        sampler = (
            DistributedSampler(samples, world, rank, shuffle=True, seed=seed, drop_last=True)
            if shuffle
            else None
        )
        return DataLoader(
            samples,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
        )


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
