"""CIFARDataModule: CIFAR-10/100 from any source in `data_dir` (lit_cifar/sources.py), split, batched, augmented.

The fast path (default): the decoded uint8 images sit in one tensor on the training device; batches are
index slices of it, and crop/flip/normalize run on the whole batch there (lit_cifar/loaders.py).
The standard path (`fast=False`): a DataLoader with per-sample crop/flip in worker processes.

    python -c "from lit_cifar import CIFARDataModule as D; d=D('data'); d.prepare_data(); d.setup('fit')"
"""

from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from lit_cifar import sources
from lit_cifar.errors import UserError, check_number
from lit_cifar.images import folder_classes, is_image_folder
from lit_cifar.loaders import Samples, TensorLoader, mix_classes, random_crop_flip, split_indices
from lit_cifar.prediction import image_loader

# Per-channel (mean, std) of the training images, over [0, 1] pixels.
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
            dataset: cifar10 or cifar100 (pickles, archives, downloads; an image folder brings its classes).
            download: fetch the archive through torchvision when nothing is in `data_dir`.
            val_size: images held out of the training split for validation: a fraction in (0, 1) or a count.
            split_seed: seed of the train/val split only (the training seed decides order and augmentation).
            batch_size: images per batch, per device.
            num_workers: DataLoader worker processes (standard path only; the fast path needs none).
            pin_memory: page-locked host memory for faster copies to a GPU (standard path).
            normalize: subtract the data set's mean and divide by its std, per channel.
            augment: random crop (of the image padded by `crop_padding`) and horizontal flip, training only.
            crop_padding: pixels of padding around each image before the random 32x32 crop.
            padding_mode: how those pixels are filled: constant (zeros, as torchvision's RandomCrop) or reflect.
            fast: keep the data set as one tensor on the training device and augment per batch.
            checksums: md5 per file name, replacing the official ones for those files (for data you made).
            predict_dir: images to predict: a folder (searched recursively), an image, or a list; any size.
        """
        super().__init__()
        if dataset not in sources.DATASETS:
            raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(sources.DATASETS)}.")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("split_seed", split_seed, 0),
        ):
            check_number(name, value, low)
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
        self._prepared: dict[str, dict] = {}  # what prepare_data read, for setup in the same process
        self._train_loader: TensorLoader | None = None
        self._train_state: dict | None = None  # a resumed run's place in the training data
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # see normalization()

    @property
    def classes(self) -> list[str]:
        if self._classes is not None:
            return self._classes
        if is_image_folder(self.hparams.data_dir):
            return folder_classes(self.hparams.data_dir)
        # Before the files are read (to size the model); setup() takes the meta file's names.
        return CIFAR10_CLASSES if self.hparams.dataset == "cifar10" else sources.CIFAR100_CLASSES

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return MEAN_STD[self.hparams.dataset]

    @property
    def has_test(self) -> bool:
        return sources.has_test(self.hparams.data_dir)

    def prepare_data(self) -> None:
        if self.trainer is not None and self.trainer.predicting:
            return  # prediction reads only its own images
        hp = self.hparams
        # validate and test read only their own split. fit checks (and caches) the test split too, so
        # a run that tests after training (scripts/train.py) cannot fail on its data at the end.
        stage = self.trainer.state.fn if self.trainer is not None else "fit"
        fit = ["train", "test"] if self.has_test else ["train"]
        splits = {"validate": ["train"], "test": ["test"]}.get(stage, fit)
        for split in splits:
            self._prepared[split] = sources.prepare(hp.data_dir, hp.dataset, hp.download, hp.checksums, split)
        if "train" in splits:  # a bad val_size fails here, before any log is written
            split_indices(len(self._prepared["train"]["train"][1]), hp.val_size, hp.split_seed)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:  # the constants reach the device now, before any step
            self.normalization(self.trainer.strategy.root_device)
        split, hp = "test" if stage == "test" else "train", self.hparams  # val is cut from train
        prepared = self._prepared.pop(split, None)  # what prepare_data read in this process, if anything
        if stage == "predict" or split in self.data:
            return
        # No second look at every file when prepare_data ran here; else the cache.
        loaded = prepared or sources.load(hp.data_dir, hp.dataset, hp.checksums, (split,))
        self._classes = loaded.get("classes", self._classes)
        if split == "test":
            self.data["test"] = loaded["test"] and mix_classes(*loaded["test"])
            return
        x, y = loaded["train"]
        train, val = split_indices(len(y), hp.val_size, hp.split_seed)
        self.data.update(train=(x[train], y[train]), val=mix_classes(x[val], y[val]))

    # The training loader's place is kept with the DataModule's state too: Lightning restores that before
    # anything builds a loader. (It restores a loader's own state only when it builds the loader after the
    # checkpoint was read, which a schedule asking estimated_stepping_batches in configure_optimizers prevents.)
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
        return image_loader(self.hparams.predict_dir, self.hparams.batch_size, self.hparams.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # (B, 3, 32, 32) uint8 on the device (augmented already when training) -> float32.
        # A bare tensor (images only) passes too; float input (the model summary's example) is left be.
        x, rest = (batch, None) if isinstance(batch, torch.Tensor) else (batch[0], batch[1:])
        if x.dtype != torch.uint8:
            return batch
        return self.to_float(x) if rest is None else (self.to_float(x), *rest)

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

    def _loader(self, split: str):
        (x, y), trainer, hp, train = self.data[split], self.trainer, self.hparams, split == "train"
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # Lightning turns shuffling off for overfit_batches by swapping a DataLoader's sampler; it
        # cannot do that to a TensorLoader, so the data module does it, on both paths.
        shuffle = train and not (trainer is not None and trainer.overfit_batches)
        # The training seed (seed_everything's, the same on every rank) decides the batch order and the
        # augmentation; split_seed only the split.
        seed = torch.initial_seed() % 2**63
        if hp.fast:
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            crop_flip = partial(random_crop_flip, padding=hp.crop_padding, padding_mode=hp.padding_mode)
            loader = TensorLoader(
                x.to(device),
                y.to(device),
                hp.batch_size,
                shuffle,
                seed,
                rank,
                world,
                drop_last=train,
                augment=crop_flip if hp.augment and train else None,
                epoch=(lambda: trainer.current_epoch) if trainer is not None else None,
            )
            if train:
                self._train_loader = loader
                if self._train_state is not None:
                    loader.load_state_dict(self._train_state)
                    self._train_state = None
            return loader
        crop_flip = v2.Compose(
            [v2.RandomCrop(32, hp.crop_padding, padding_mode=hp.padding_mode), v2.RandomHorizontalFlip()]
        )
        # The fast path's order exactly: DistributedSampler permutes with seed + epoch (Lightning calls its
        # set_epoch) and gives rank r every world-th image; unshuffled loaders get Lightning's own under DDP.
        # Crops and flips come from each worker's random state (seeded by Lightning from the seed and rank).
        samples = Samples(x, y, crop_flip if hp.augment and train else v2.Identity())
        sampler = (
            DistributedSampler(samples, world, rank, shuffle=True, seed=seed, drop_last=True)
            if shuffle
            else None
        )
        return DataLoader(
            samples,
            hp.batch_size,
            sampler=sampler,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.num_workers > 0,
        )
