"""The fast path (uint8 tensor on the device, per-batch crop/flip) against the standard path
(DataLoader + torchvision v2 per-sample transforms): same shapes, dtypes, labels, augmentation.

Every image encodes where its pixels came from: channel 0 holds row + 1, channel 1 column + 1,
channel 2 a code of the image's label. So from any output image we read back its crop offset and
flip, check that it is exactly the padded original cropped there, and that its label came with it.
"""

from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, write_pickles
from torch.nn import functional as F
from torch.utils.data import DistributedSampler

from lit_cifar import CIFARClassifier
from lit_cifar.data import CIFARDataModule
from lit_cifar.loaders import TensorLoader, random_crop_flip

N, PAD, SIZE = 300, 4, 32  # training images (after 12 held out for validation), padding, side
OFFSETS = 2 * PAD + 1  # crop offsets per axis: 0..2*PAD


def label_code(label: torch.Tensor) -> torch.Tensor:
    return 40 + 20 * label  # 40..220: never 0, so zero padding stays recognizable


def template(labels: torch.Tensor) -> torch.Tensor:
    """(len(labels), 3, 32, 32) uint8: row + 1, column + 1, label code."""
    idx = torch.arange(1, SIZE + 1, dtype=torch.uint8)
    x = torch.empty(len(labels), 3, SIZE, SIZE, dtype=torch.uint8)
    x[:, 0] = idx.view(SIZE, 1)
    x[:, 1] = idx.view(1, SIZE)
    x[:, 2] = label_code(labels).view(-1, 1, 1)
    return x


@pytest.fixture
def coded(tmp_path) -> tuple[str, dict[str, str]]:
    """CIFAR-10 pickles of N + 12 coded training images (12 for validation) and 10 test images; md5s."""
    n = N + 12
    labels = torch.randint(0, 10, (n + 10,), generator=torch.Generator().manual_seed(0))
    images = template(labels)
    train = list(zip(images[:n].tensor_split(5), labels[:n].tensor_split(5), strict=True))
    _, md5s = write_pickles(tmp_path, [*train, (images[n:], labels[n:])], [f"c{i}" for i in range(10)])
    return str(tmp_path), md5s


def fake_trainer(rank: int = 0, world_size: int = 1, overfit_batches: int = 0) -> SimpleNamespace:
    """What the data module reads from its trainer: the rank, the device, the epoch, overfitting."""
    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    return SimpleNamespace(
        global_rank=rank,
        world_size=world_size,
        strategy=strategy,
        current_epoch=0,
        overfit_batches=overfit_batches,
    )


def batches(coded, fast: bool, split: str = "train", epochs: int = 1, trainer=None, **kwargs):
    """(x, y) as the model gets them, epoch after epoch: through the loader and on_after_batch_transfer."""
    data_dir, md5s = coded
    kwargs = {"val_size": 12, "batch_size": 64, **kwargs}
    dm = CIFARDataModule(data_dir, fast=fast, checksums=md5s, **kwargs)
    dm.setup("fit")
    dm.trainer = trainer or fake_trainer()
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    out = []
    for epoch in range(epochs):  # as Lightning: the trainer's epoch, and the sampler's set_epoch
        dm.trainer.current_epoch = epoch
        if isinstance(getattr(loader, "sampler", None), DistributedSampler):
            loader.sampler.set_epoch(epoch)
        out += [dm.on_after_batch_transfer(batch, 0) for batch in loader]
    return out, len(loader)


def decode(x: torch.Tensor, y: torch.Tensor, padding_mode: str) -> dict[str, torch.Tensor]:
    """Read back each image's crop offset and flip; check it is exactly that crop of its original."""
    pixels = (x * 255).round().to(torch.uint8)  # normalize=False: x = pixels / 255
    c = SIZE // 2  # the centre pixel is inside the original for any offset
    flip = pixels[:, 1, c, c + 1] < pixels[:, 1, c, c - 1]  # columns run backwards
    dy = pixels[:, 0, c, c].long() - (c + 1) + PAD
    dx = pixels[:, 1, c, c].long() - (c + 1) + PAD + flip.long()  # flipped: centre shows column c-1
    padded = F.pad(template(y).float(), (PAD,) * 4, mode=padding_mode).to(torch.uint8)
    for i in range(len(y)):
        expected = padded[i, :, dy[i] : dy[i] + SIZE, dx[i] : dx[i] + SIZE]
        expected = expected.flip(2) if flip[i] else expected
        assert torch.equal(pixels[i], expected), (
            f"image {i}: not its label's original cropped at {dy[i]}, {dx[i]}"
        )
    return {"dy": dy, "dx": dx, "flip": flip, "zero": (pixels[:, 2] == 0).float().mean((1, 2))}


def augmentation_stats(coded, fast: bool, padding_mode: str) -> dict[str, torch.Tensor]:
    out, _ = batches(coded, fast, epochs=6, normalize=False, padding_mode=padding_mode)
    parts = [decode(x, y, padding_mode) for x, y in out]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def test_same_shapes_dtypes_and_lengths(coded):
    fast, n_fast = batches(coded, fast=True)
    std, n_std = batches(coded, fast=False)
    assert n_fast == n_std == len(fast) == len(std) == 5  # ceil(300 / 64): the last batch is partial
    for (xf, yf), (xs, ys) in zip(fast, std, strict=True):
        assert xf.shape == xs.shape and yf.shape == ys.shape
        assert xf.dtype == xs.dtype == torch.float32 and yf.dtype == ys.dtype == torch.int64
    assert [len(y) for _, y in fast] == [64, 64, 64, 64, 44]


@pytest.mark.parametrize("fast", [True, False])
def test_labels_stay_with_their_images(coded, fast):
    seen = []
    for x, y in batches(coded, fast, normalize=False)[0]:
        code = (x[:, 2] * 255).round().amax((1, 2))  # padding is 0, the image's own pixels its code
        assert torch.equal(code.long(), label_code(y))
        seen.append(y)
    assert len(torch.cat(seen)) == N  # every training image once per epoch


@pytest.mark.parametrize("padding_mode", ["constant", "reflect"])
def test_augmentation_statistics_match_torchvision(coded, padding_mode):
    torch.manual_seed(0)
    stats = {fast: augmentation_stats(coded, fast, padding_mode) for fast in (True, False)}
    for s in stats.values():
        assert len(s["dy"]) == 6 * N
        # uniform offsets 0..2p on each axis (std of each frequency here ~0.007)
        for axis in ("dy", "dx"):
            freq = torch.bincount(s[axis], minlength=OFFSETS).float() / len(s[axis])
            assert len(freq) == OFFSETS and (freq - 1 / OFFSETS).abs().max() < 0.04, freq
        assert abs(s["flip"].float().mean() - 0.5) < 0.05
        # flips do not depend on the offset: flip rate among left vs right shifted crops
        left, right = s["flip"][s["dx"] < PAD].float().mean(), s["flip"][s["dx"] > PAD].float().mean()
        assert abs(left - right) < 0.1
    # zero padding: constant pads with zeros (as much as the offsets imply), reflect never does
    expected_zero = lambda s: 1 - (1 - (s["dy"] - PAD).abs() / SIZE) * (1 - (s["dx"] - PAD).abs() / SIZE)  # noqa: E731
    for s in stats.values():
        if padding_mode == "constant":
            assert torch.allclose(s["zero"], expected_zero(s))
            # E|offset - p| = 20/9 pixels per axis, so E[zero fraction] = 1 - (1 - 20/9/32)^2 ~ 0.134
            assert abs(s["zero"].mean() - (1 - (1 - 20 / 9 / SIZE) ** 2)) < 0.01
        else:
            assert s["zero"].max() == 0
    fast_zero, std_zero = stats[True]["zero"].mean(), stats[False]["zero"].mean()
    assert abs(fast_zero - std_zero) < 0.01


def test_normalized_statistics_match(coded):
    torch.manual_seed(0)
    moments = {}
    for fast in (True, False):
        x = torch.cat([x for x, _ in batches(coded, fast, epochs=4)[0]])  # normalized
        moments[fast] = (x.mean((0, 2, 3)), x.std((0, 2, 3)))
    assert torch.allclose(moments[True][0], moments[False][0], atol=0.02)
    assert torch.allclose(moments[True][1], moments[False][1], rtol=0.02)


@pytest.mark.parametrize("normalize", [True, False])
def test_validation_batches_are_identical(coded, normalize):
    fast, _ = batches(coded, fast=True, split="val", normalize=normalize)
    std, _ = batches(coded, fast=False, split="val", normalize=normalize)
    assert len(fast) == len(std) == 1
    (xf, yf), (xs, ys) = fast[0], std[0]
    assert torch.equal(xf, xs) and torch.equal(yf, ys)  # no augmentation, same order, same arithmetic


@pytest.mark.parametrize("padding_mode", ["constant", "reflect"])
def test_random_crop_flip_is_pad_crop_flip(padding_mode):
    """Any dtype, any padding (0 too): each image is its padded self, cropped and maybe mirrored."""
    x = torch.randn(16, 3, 8, 8)
    for padding in (0, 1, 3):
        out = random_crop_flip(x, padding, padding_mode)
        padded = F.pad(x, (padding,) * 4, mode=padding_mode)
        for i in range(len(x)):
            crops = [
                padded[i, :, dy : dy + 8, dx : dx + 8]
                for dy in range(2 * padding + 1)
                for dx in range(2 * padding + 1)
            ]
            assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in crops)


# ---------------------------------------------------------------------------- seeds: who decides what


@pytest.fixture
def seeded():
    """seed_everything as the CLI calls it (conftest keeps its PL_* variables from other tests)."""

    def seed(value: int) -> None:
        L.seed_everything(value, verbose=False)
        torch.rand(value)  # however much of the global random state is used later, nothing changes

    return seed


def test_the_training_seed_decides_order_and_augmentation(coded, seeded):
    runs = {}
    for seed in (1, 2, 1):
        seeded(seed)
        out, _ = batches(coded, fast=True, epochs=2, normalize=False)
        runs.setdefault(seed, []).append(out)
    (a, again), (b,) = runs[1], runs[2]
    assert all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, again, strict=True)
    )
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in b]))  # another order
    # the same images in the same order, another seed: other crops and flips
    images, labels = template(torch.arange(10).repeat(20)), torch.arange(10).repeat(20)

    def crops(seed: int) -> dict[str, torch.Tensor]:
        augment = partial(random_crop_flip, padding=PAD)
        (x, y), *_ = TensorLoader(images, labels, 200, shuffle=False, seed=seed, augment=augment)
        return decode(x / 255, y, "constant")

    assert all(torch.equal(crops(1)[k], crops(1)[k]) for k in ("dy", "dx", "flip"))
    assert not torch.equal(crops(1)["dy"], crops(2)["dy"]) and not torch.equal(
        crops(1)["flip"], crops(2)["flip"]
    )


def test_split_seed_decides_only_the_split(coded, seeded):
    def split(seed: int, split_seed: int) -> torch.Tensor:
        seeded(seed)
        dm = CIFARDataModule(coded[0], val_size=12, split_seed=split_seed, checksums=coded[1])
        dm.setup("fit")
        return dm.data["val"][0]

    assert torch.equal(split(1, 0), split(2, 0))
    assert not torch.equal(split(1, 0), split(1, 1))


def test_the_fast_path_leaves_the_global_random_state_alone(coded):
    before = torch.get_rng_state()
    batches(coded, fast=True, epochs=2)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_standard_path_reads_the_fast_paths_order(coded, seeded):
    seeded(3)  # without augmentation the two paths hand the model the same batches, epoch after epoch
    fast, _ = batches(coded, fast=True, epochs=2, augment=False)
    std, _ = batches(coded, fast=False, epochs=2, augment=False)
    assert all(
        torch.equal(xf, xs) and torch.equal(yf, ys) for (xf, yf), (xs, ys) in zip(fast, std, strict=True)
    )


def test_each_ddp_rank_draws_its_own_crops_reproducibly(coded, seeded):
    def rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
        seeded(0)  # every rank is seeded alike, as Lightning does
        out, _ = batches(coded, fast=True, trainer=fake_trainer(rank, world_size=2), normalize=False)
        return [decode(x, y, "reflect") for x, y in out]

    r0, r0_again, r1 = rank_batches(0), rank_batches(0), rank_batches(1)
    for k in ("dy", "dx", "flip"):
        assert torch.equal(torch.cat([b[k] for b in r0]), torch.cat([b[k] for b in r0_again]))
        assert not torch.equal(torch.cat([b[k] for b in r0]), torch.cat([b[k] for b in r1]))


def test_a_limited_epoch_resumes_at_the_next_epochs_start():
    # limit_train_batches=2: the checkpoint at the epoch's end has handed out 2 of 5 batches.
    images, labels = torch.arange(40).view(40, 1), torch.arange(40)
    state = {"epoch": 0, "batches_done": 2}
    resumed = TensorLoader(images, labels, 8, shuffle=True, seed=5, epoch=lambda: 1)  # the trainer's epoch
    resumed.load_state_dict(state)
    uninterrupted = TensorLoader(images, labels, 8, shuffle=True, seed=5, epoch=lambda: 1)
    assert [y.tolist() for _, y in resumed] == [y.tolist() for _, y in uninterrupted]
    assert len(list(resumed)) == 5


# ---------------------------------------------------------------------------- Lightning's loader options


class RecordBatches(L.Callback):
    """Each training epoch's images, as fingerprints (the sum of each image's pixels)."""

    def __init__(self) -> None:
        self.epochs: list[list[float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.epochs[-1] += batch[0].flatten(1).sum(1).tolist()


def record(image_folder, fast: bool = True, **trainer_kwargs) -> tuple[list[list[float]], CIFARDataModule]:
    torch.manual_seed(0)
    data = CIFARDataModule(str(image_folder), val_size=12, batch_size=8, augment=False, fast=fast)
    recorder = RecordBatches()
    trainer = quiet_trainer(limit_val_batches=0, callbacks=[recorder], **trainer_kwargs)
    trainer.fit(CIFARClassifier("seed", num_classes=3), datamodule=data)
    return recorder.epochs, data


def test_reloaded_loaders_go_on_with_the_next_epochs_order(image_folder):
    plain, _ = record(image_folder, max_epochs=3)
    reloaded, _ = record(image_folder, max_epochs=3, reload_dataloaders_every_n_epochs=1)
    assert reloaded == plain and plain[0] != plain[1] != plain[2]


@pytest.mark.parametrize("fast", [True, False])
def test_overfit_batches_reads_the_same_first_batches_each_epoch(image_folder, fast):
    epochs, data = record(image_folder, fast=fast, max_epochs=2, overfit_batches=2)
    x, _ = data.data["train"]
    first = data.to_float(x[:16]).flatten(1).sum(1).tolist()  # the split's first 16 images, in order
    assert epochs == [pytest.approx(first)] * 2


# ---------------------------------------------------------------------------- evaluation order


@pytest.mark.parametrize("fast", [True, False])
def test_any_prefix_of_val_and_test_covers_the_classes(image_folder, fast):
    def labels(seed: int) -> list[list[torch.Tensor]]:
        torch.manual_seed(seed)  # the training seed: no part in the evaluation order
        dm = CIFARDataModule(str(image_folder), val_size=12, batch_size=4, fast=fast)  # files in class order
        dm.setup("fit")
        dm.setup("test")  # each stage reads its own split
        dm.trainer = fake_trainer()
        return [[y for _, y in loader] for loader in (dm.val_dataloader(), dm.test_dataloader())]

    val, test = labels(0)
    assert set(val[0].tolist()) == set(test[0].tolist()) == {0, 1, 2}  # the first batch: every class
    assert len(torch.cat(val)) == 12 and torch.bincount(torch.cat(test)).tolist() == [4, 4, 4]  # each once
    assert [torch.cat(v).tolist() for v in labels(1)] == [torch.cat(val).tolist(), torch.cat(test).tolist()]
