"""The fast path (uint8 tensor on the device, per-batch crop/flip) against the standard path
(DataLoader + torchvision v2 per-sample transforms): same shapes, dtypes, labels, augmentation.

Every image encodes where its pixels came from: channel 0 holds row + 1, channel 1 column + 1,
channel 2 a code of the image's label. So from any output image we read back its crop offset and
flip, check that it is exactly the padded original cropped there, and that its label came with it.
"""

import hashlib
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from lit_cifar.data import CIFARDataModule, TensorLoader, random_crop_flip

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


def write_coded_batches(root: Path, n: int) -> dict[str, str]:
    """root/cifar-10-batches-py holding n coded training images (and a small test batch); md5s."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = torch.randint(0, 10, (n + 10,), generator=torch.Generator().manual_seed(0))
    images = template(labels).reshape(-1, 3 * SIZE * SIZE)
    chunks = [range(i * n // 5, (i + 1) * n // 5) for i in range(5)] + [range(n, n + 10)]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, rows in zip(names, chunks, strict=True):
        entry = {
            "data": images[rows.start : rows.stop].numpy(),
            "labels": labels[rows.start : rows.stop].tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture
def coded(tmp_path) -> tuple[str, dict[str, str]]:
    return str(tmp_path), write_coded_batches(tmp_path, N + 12)


def fake_trainer(training: bool) -> SimpleNamespace:
    """What the data module reads from its trainer: the stage, the rank, the device."""
    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    return SimpleNamespace(training=training, global_rank=0, world_size=1, strategy=strategy)


def batches(coded, fast: bool, split: str = "train", epochs: int = 1, **kwargs):
    """(x, y) as the model gets them: through the loader and on_after_batch_transfer."""
    data_dir, md5s = coded
    dm = CIFARDataModule(data_dir, val_size=12, batch_size=64, fast=fast, checksums=md5s, **kwargs)
    dm.setup("fit")
    dm.trainer = fake_trainer(training=split == "train")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    out = [dm.on_after_batch_transfer(batch, 0) for _ in range(epochs) for batch in loader]
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


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_each_rank_reads_its_own_shard(world_size, shuffle):
    n = 100
    labels = torch.arange(n)  # each label names its image
    images = labels.view(n, 1, 1, 1).expand(n, 3, 2, 2).to(torch.uint8)

    def shard(rank: int, epochs: int = 1) -> list[torch.Tensor]:
        loader = TensorLoader(images, labels, 16, shuffle, seed=3, rank=rank, world_size=world_size)
        out = []
        for _ in range(epochs):
            seen = []
            for x, y in loader:
                assert torch.equal(x[:, 0, 0, 0].long(), y)  # images and labels indexed together
                seen.append(y)
            out.append(torch.cat(seen))
        assert [len(loader)] * epochs == [len(range(0, len(o), 16)) for o in out]
        return out

    shards = [shard(r, epochs=2) for r in range(world_size)]
    for epoch in range(2):
        parts = [s[epoch] for s in shards]
        union = torch.cat(parts)
        assert len(set(union.tolist())) == len(union)  # disjoint
        if shuffle:  # equal shards, all but n % world_size images each epoch
            assert {len(p) for p in parts} == {n // world_size}
        else:  # evaluation: every image exactly once
            assert sorted(union.tolist()) == list(range(n))
    if shuffle:  # a new order each epoch, and ranks agree on it (disjoint again in epoch 2)
        assert not torch.equal(shards[0][0], shards[0][1])


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
