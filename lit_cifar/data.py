"""CIFARDataModule: CIFAR-10/100 from any source in `data_dir`, split, batched, augmented per batch.

The fast path (default): the decoded uint8 images sit in one tensor on the training device;
batches are index slices of it, and crop/flip/normalize run on the whole batch there.
The standard path (`fast=False`): a DataLoader with per-sample crop/flip in worker processes.

    python -c "from lit_cifar import CIFARDataModule as D; d=D('data'); d.prepare_data(); d.setup('fit')"
"""

import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lit_cifar import inference, sources
from lit_cifar.errors import UserError

# Per-channel statistics of the training images, over [0, 1] pixels.
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
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
            split_seed: seed of the train/val split (independent of the training seed).
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
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}.")
        if num_workers < 0:
            raise UserError(f"num_workers must be 0 or more, got {num_workers}.")
        if val_size <= 0 or (val_size > 1 and val_size != int(val_size)):
            raise UserError(
                f"val_size must be a fraction in (0, 1) or a whole count of at least 1, got {val_size}."
            )
        if padding_mode not in ("constant", "reflect"):
            raise UserError(f"padding_mode must be constant or reflect, got {padding_mode!r}.")
        if crop_padding < 0:
            raise UserError(f"crop_padding must be 0 or more, got {crop_padding}.")
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
            return sources.folder_classes(Path(self.hparams.data_dir) / "train")
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
        return self.data.get("test") is not None

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        if self.trainer is not None and self.trainer.predicting:
            return  # prediction reads only its own images
        hp = self.hparams
        n = sources.prepare(hp.data_dir, hp.dataset, hp.download, hp.checksums)
        split_indices(n, hp.val_size, hp.split_seed)  # a bad val_size fails here, before any log is written

    def setup(self, stage: str) -> None:
        if self.trainer is not None:  # the constants reach the device now, before any step
            self.normalization(self.trainer.strategy.root_device)
        if self.data or stage == "predict":
            return
        loaded = sources.load(self.hparams.data_dir, self.hparams.dataset, self.hparams.checksums)
        self._classes = loaded["classes"]
        train_idx, val_idx = split_indices(
            len(loaded["train"][1]), self.hparams.val_size, self.hparams.split_seed
        )
        x, y = loaded["train"]
        self.data = {
            "train": (x[train_idx], y[train_idx]),
            "val": (x[val_idx], y[val_idx]),
            "test": loaded["test"],
        }

    # The training loader's place is kept with the DataModule's state too: Lightning restores that
    # before anything builds a loader. (It restores a loader's own state only when it builds the
    # loader after the checkpoint was read, which a schedule asking estimated_stepping_batches in
    # configure_optimizers prevents.)
    def state_dict(self) -> dict:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader else {}

    def load_state_dict(self, state: dict) -> None:
        self._train_state = state.get("train_loader")

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        if not self.has_test:
            raise UserError(
                f"{self.hparams.data_dir} has no test split: add test/<class>/ images (or use the "
                f"CIFAR pickles, which include one), or run `validate` instead."
            )
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        if self.hparams.predict_dir is None:
            raise UserError("nothing to predict: give images with --data.predict_dir FOLDER_OR_IMAGE.")
        return inference.image_loader(
            self.hparams.predict_dir, self.hparams.batch_size, self.hparams.num_workers
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # (B, 3, 32, 32) uint8 on the device -> float32, augmented when training on the fast path.
        # A bare tensor (images only) passes too; float input (the model summary's example) is left be.
        x, rest = (batch, None) if isinstance(batch, torch.Tensor) else (batch[0], batch[1:])
        if x.dtype != torch.uint8:
            return batch
        if self.hparams.fast and self.hparams.augment and self.trainer is not None and self.trainer.training:
            x = random_crop_flip(x, self.hparams.crop_padding, self.hparams.padding_mode)
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

    def _loader(self, split: str, shuffle: bool):
        x, y = self.data[split]
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.hparams.fast:
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            loader = TensorLoader(
                x.to(device),
                y.to(device),
                self.hparams.batch_size,
                shuffle,
                seed=self.hparams.split_seed,
                rank=rank,
                world_size=world,
            )
            if split == "train":
                self._train_loader = loader
                if self._train_state is not None:
                    loader.load_state_dict(self._train_state)
                    self._train_state = None
            return loader
        augment = self.hparams.augment and split == "train"
        transform = v2.Compose(
            [
                v2.RandomCrop(32, self.hparams.crop_padding, padding_mode=self.hparams.padding_mode),
                v2.RandomHorizontalFlip(),
            ]
        )
        # Lightning swaps in a DistributedSampler under DDP, so each rank reads its own shard.
        return DataLoader(
            _Samples(x, y, transform if augment else None),
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
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


def random_crop_flip(x: torch.Tensor, padding: int, padding_mode: str = "constant") -> torch.Tensor:
    """Per-image random crop of a padded batch and random horizontal flip, on x's device.

    The same distribution as torchvision's RandomCrop(32, padding, padding_mode=...) +
    RandomHorizontalFlip(), drawn for each image. No padded copy is made: each output pixel's
    source pixel is computed (shifted, mirrored for the flip, reflected or zeroed at the border)
    and the whole batch is one gather. x: (B, C, H, W), any dtype.
    """
    b, c, h, w = x.shape
    dev = x.device
    dy = torch.randint(0, 2 * padding + 1, (b, 1, 1, 1), device=dev) - padding  # shift in [-p, p]
    dx = torch.randint(0, 2 * padding + 1, (b, 1, 1, 1), device=dev) - padding
    flip = torch.rand(b, 1, 1, 1, device=dev) < 0.5
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
    """Batches sliced from tensors that already sit on the training device.

    Each epoch draws one permutation (seeded by epoch, the same on every rank); rank r takes
    every world_size-th index, so ranks see disjoint shards of equal length. It keeps its place
    (`state_dict`), so a run resumed mid-epoch continues with the batches it had not seen.

    Resuming is exact: `batches_done` counts the batches handed out, and Lightning's training
    fetcher asks for a batch only when it trains on it (it reads ahead only for loaders without a
    length), so a checkpoint written after step k continues at batch k+1. The state also holds the
    global random generators (CPU and the loader's GPU), which augment the batches
    (`random_crop_flip`): the resumed run draws the crops and flips an uninterrupted one would.
    Under DDP every rank draws the same numbers (same seed, equal shards), so rank 0's state,
    the one a checkpoint keeps, is every rank's.
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
    ) -> None:
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.batches_done = -1, 0  # the first pass is epoch 0
        self._resume: dict | None = None  # a state_dict() the next pass continues from

    def _order(self) -> torch.Tensor:
        n = len(self.labels)
        if not self.shuffle:  # evaluation: every image exactly once over all ranks
            return torch.arange(self.rank, n, self.world_size)
        n -= n % self.world_size  # equal shards, so no rank waits on another at the last step
        order = torch.randperm(
            len(self.labels), generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        return order[:n][self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self.labels)
        count = (
            (n - n % self.world_size) // self.world_size
            if self.shuffle
            else len(range(self.rank, n, self.world_size))
        )
        return math.ceil(count / self.batch_size)

    def __iter__(self):
        # A fresh pass starts the next epoch, unless load_state_dict() asked to continue one.
        resume, self._resume = self._resume, None
        if resume is None:
            self.epoch, self.batches_done = self.epoch + 1, 0
        else:
            finished = resume["batches_done"] >= len(self)  # saved at the epoch's end: start the next
            self.epoch, self.batches_done = (
                resume["epoch"] + finished,
                0 if finished else resume["batches_done"],
            )
            self._set_rng(resume)
        order = self._order().to(self.labels.device)
        for start in range(self.batches_done * self.batch_size, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            self.batches_done += 1
            yield self.images[idx], self.labels[idx]

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "batches_done": self.batches_done, "rng": torch.get_rng_state()}
        if self.images.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.images.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        self._resume = state  # applied when the next pass starts: no random draw can come in between

    def _set_rng(self, state: dict) -> None:
        if "rng" in state:
            torch.set_rng_state(state["rng"].cpu())
        if "cuda_rng" in state and self.images.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.images.device)
