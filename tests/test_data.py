"""The data layer: every source, every bad input through the real entry points, the cache, the split.

python -m pytest tests/test_data.py -q
"""

import contextlib
import functools
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CLASSES,
    REPO,
    checksum_config,
    md5s_of,
    quiet_trainer,
    random_batch,
    run,
    write_batches,
    write_image_folder,
    write_pickles,
)
from PIL import Image, ImageFile, ImageOps

from lit_cifar import CIFARDataModule, images, sources
from lit_cifar.cli import LitCifarCLI, main
from lit_cifar.errors import UserError
from lit_cifar.images import find_images, read_image
from lit_cifar.loaders import TensorLoader, split_indices
from lit_cifar.module import CIFARClassifier
from lit_cifar.prediction import ImageFiles

FIT = ["lit-cifar", "fit", "--trainer.accelerator=cpu", "--trainer.max_epochs=1"]


# ---------------------------------------------------------------------------- helpers


def write_archive(batches_root: Path, dest: Path) -> tuple[Path, dict[str, str]]:
    """dest/cifar-10-python.tar.gz holding batches_root's cifar-10-batches-py; returns (path, md5s)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5s = md5s_of(batches_root / "cifar-10-batches-py")
    md5s[archive.name] = hashlib.md5(archive.read_bytes()).hexdigest()
    return archive, md5s


def snapshot(root: Path) -> set[str]:
    """Every file and folder under root (but matplotlib's font cache, which it writes on import)."""
    paths = {str(p.relative_to(root)) for p in root.rglob("*")}
    return {p for p in paths if "matplotlib" not in p and p != "user-cache"}


def fails(*args: str) -> str:
    """Run an entry point that must refuse its input; return what it printed for the user."""
    proc = run(*args, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: " in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("error: ") :]
    assert len(message.splitlines()) <= 6, message  # short: the problem and the fix
    return message


def loaded(data_dir: Path, **kwargs) -> CIFARDataModule:
    dm = CIFARDataModule(str(data_dir), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------- sources


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_image_folder_png_and_jpeg_with_grayscale_rgba_palette_cmyk(tmp_path, fmt):
    root = write_image_folder(tmp_path / "images", per_class=10, test_per_class=2, fmt=fmt)
    Image.new("L", (32, 32), 90).save(root / f"train/cat/0000.{fmt}")  # grayscale
    # RGBA (alpha dropped) for PNG; JPEG has no alpha, so CMYK there
    other = Image.new("RGBA", (32, 32), (200, 30, 60, 128)) if fmt == "png" else Image.new("CMYK", (32, 32))
    other.save(root / f"train/dog/0000.{fmt}")
    if fmt == "png":  # a palette image
        Image.new("RGB", (32, 32), (10, 200, 30)).convert("P").save(root / "train/ship/0000.png")
    data = sources.load(root)
    x, y = data["train"]
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8 and data["classes"] == ["cat", "dog", "ship"]
    assert y.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert data["test"][0].shape == (6, 3, 32, 32)
    # Every pixel as PIL reads it in RGB (JPEG decoders may round differently, by a step or two).
    for i, path in (
        (0, "train/cat/0000"),
        (10, "train/dog/0000"),
        (20, "train/ship/0000"),
        (25, "train/ship/0005"),
    ):
        ref = torch.from_numpy(np.asarray(Image.open(root / f"{path}.{fmt}").convert("RGB")).copy())
        assert (x[i].permute(1, 2, 0).int() - ref.int()).abs().max() <= (0 if fmt == "png" else 2)
    assert (x[0, 0] == x[0, 1]).all() and (x[0, 1] == x[0, 2]).all()  # gray became three equal channels


def test_batches_verified_against_given_checksums(batches):
    root, md5s = batches
    dm = loaded(root, checksums=md5s, val_size=6)
    dm.setup("test")
    assert [len(dm.data[s][1]) for s in ("train", "val", "test")] == [54, 6, 12]
    assert dm.classes[:2] == ["airplane", "automobile"] and dm.num_classes == 10
    # Without them the official md5s apply, and the tests' own files fail: verification is never off.
    with pytest.raises(UserError, match="data_batch_1 fails its md5 check"):
        sources.load(str(root))


def test_placed_archive_is_verified_and_extracted_offline(tmp_path, batches, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(sources, "download_url", no_network)
    monkeypatch.setattr("torchvision.datasets.utils.download_url", no_network)
    archive, md5s = write_archive(batches[0], tmp_path / "placed")
    dm = loaded(archive.parent, checksums=md5s, val_size=6)
    dm.setup("test")
    assert len(dm.data["train"][1]) == 54 and len(dm.data["test"][1]) == 12
    assert (archive.parent / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert not [p for p in archive.parent.iterdir() if p.name.startswith(".lit-cifar-tmp")]


def test_download_through_torchvision(tmp_path, batches, monkeypatch):
    archive, md5s = write_archive(batches[0], tmp_path / "server")
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        shutil.copy(archive, Path(root) / filename)

    monkeypatch.setattr(sources, "download_url", fake_download)
    dm = loaded(tmp_path / "fresh" / "data", checksums=md5s, val_size=6)
    assert calls == [(sources.CIFAR10.url, "cifar-10-python.tar.gz", md5s["cifar-10-python.tar.gz"])]
    assert len(dm.data["train"][1]) == 54
    assert sorted(p.name for p in (tmp_path / "fresh" / "data").iterdir()) == [
        ".lit-cifar-cache",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
    ]


def test_cifar100_trains_with_100_classes_through_the_cli(tmp_path):
    g = torch.Generator().manual_seed(2)
    root, md5s = write_pickles(
        tmp_path / "c100", [random_batch(n, 100, g) for n in (40, 10)], sources.CIFAR100_CLASSES
    )
    args = [
        checksum_config(md5s),
        "--data.dataset=cifar100",
        f"--data.data_dir={root}",
        "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu",
    ]
    cli = LitCifarCLI(args=args, run=False)
    assert cli.model.hparams.num_classes == 100 and cli.model.net[-1].out_features == 100
    assert cli.model.hparams.class_names == sources.CIFAR100_CLASSES
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.datamodule.classes == sources.CIFAR100_CLASSES  # as read from the meta file
    assert len(cli.datamodule.data["train"][1]) == 36 and 0 <= cli.trainer.callback_metrics["val/acc"] <= 1


# ---------------------------------------------------------------------------- bad input, end to end


def _image_folder(tmp: Path, test: bool = False) -> Path:
    return write_image_folder(tmp / "images", per_class=8, test_per_class=2 if test else 0)


def bad_missing_dir(tmp):
    return [f"--data.data_dir={tmp / 'nowhere'}", "--data.download=false"], [
        f"{tmp / 'nowhere'} does not exist and download is off",
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py/",
        "train/<class>",
    ]


def bad_empty_dir(tmp):
    (tmp / "empty").mkdir()
    return [f"--data.data_dir={tmp / 'empty'}", "--data.download=false"], [
        f"{tmp / 'empty'} holds no cifar10 data and download is off",
        "Supply the data by hand",
    ]


def bad_data_dir_is_a_file(tmp):
    (tmp / "data.zip").write_bytes(b"PK")
    return [f"--data.data_dir={tmp / 'data.zip'}"], [f"{tmp / 'data.zip'} is a file", "point data_dir"]


def bad_empty_class_folder(tmp):
    root = _image_folder(tmp)
    (root / "train" / "bird").mkdir()
    return [f"--data.data_dir={root}"], [f"{root / 'train' / 'bird'} holds no images", "remove the folder"]


def bad_non_image_file(tmp):
    root = _image_folder(tmp)
    (root / "train" / "dog" / "notes.txt").write_text("not a picture")
    return [f"--data.data_dir={root}"], [
        f"{root / 'train' / 'dog' / 'notes.txt'}",
        "not PNG or JPEG",
        "Move them out",
    ]


def bad_corrupt_image(tmp):
    root = _image_folder(tmp)
    png = root / "train" / "cat" / "0003.png"
    png.write_bytes(png.read_bytes()[:60])  # truncated mid-file
    (root / "train" / "ship" / "0001.png").write_bytes(b"\x89PNG garbage")
    return [f"--data.data_dir={root}"], [
        "2 file(s)",
        f"{png}",
        f"{root / 'train' / 'ship' / '0001.png'}",
        "corrupt or truncated",
        "Replace or remove them",
    ]


def bad_train_test_classes_differ(tmp):
    root = _image_folder(tmp, test=True)
    (root / "test" / "ship").rename(root / "test" / "boat")
    return [f"--data.data_dir={root}"], [
        "different class folders",
        "only in train: ['ship']",
        "only in test: ['boat']",
        "make them the same",
    ]


def bad_not_32x32(tmp):
    root = _image_folder(tmp)
    for name in ("cat/0002.png", "cat/0005.png", "dog/0000.png", "ship/0007.png"):
        Image.new("RGB", (40, 30)).save(root / "train" / name)
    return [f"--data.data_dir={root}"], [
        "4 file(s)",
        f"{root / 'train/cat/0002.png'} (40x30), {root / 'train/cat/0005.png'} (40x30)",
        "(and 1 more)",
        "resize them to 32x32 first",
    ]


def _batches(tmp: Path):
    root, md5s = write_batches(tmp / "pickles")
    return root, root / "cifar-10-batches-py", checksum_config(md5s)


def bad_batch_truncated(tmp):
    root, folder, config = _batches(tmp)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    return [config, f"--data.data_dir={root}"], [f"{path} fails its md5 check", f"delete {folder}"]


def bad_batch_tampered(tmp):
    root, folder, config = _batches(tmp)
    path = folder / "test_batch"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, same size
    path.write_bytes(bytes(data))
    return [config, f"--data.data_dir={root}"], [f"{path} fails its md5 check", "supply the data again"]


def bad_batch_missing(tmp):
    root, folder, config = _batches(tmp)
    (folder / "data_batch_2").unlink()
    return [config, f"--data.data_dir={root}"], [
        f"{folder / 'data_batch_2'} is missing",
        "copy the whole cifar-10-batches-py/ folder again",
    ]


def bad_archive_tampered(tmp):
    batches_root, _ = write_batches(tmp / "src")
    archive, md5s = write_archive(batches_root, tmp / "placed")
    data = bytearray(archive.read_bytes())
    data[-100] ^= 1
    archive.write_bytes(bytes(data))
    return [checksum_config(md5s), f"--data.data_dir={archive.parent}"], [
        f"{archive} fails its md5 check",
        "delete it and download or copy it again",
    ]


def bad_val_size_zero(tmp):
    return [f"--data.data_dir={_image_folder(tmp)}", "--data.val_size=0"], ["val_size must be", "got 0"]


def bad_val_size_whole_train_set(tmp):
    return [f"--data.data_dir={_image_folder(tmp)}", "--data.val_size=24"], [
        "val_size=24 holds out 24 of 24 training images",
        "a count below 24",
    ]


# The data are fine here, only the setting is not: their cache is complete and serves the next run.
bad_val_size_whole_train_set.keeps_cache = True


def bad_batch_size_zero(tmp):
    return [f"--data.data_dir={_image_folder(tmp)}", "--data.batch_size=0"], ["batch_size must be at least 1"]


def bad_num_workers_negative(tmp):
    return [f"--data.data_dir={_image_folder(tmp)}", "--data.num_workers=-1"], [
        "num_workers must be 0 or more"
    ]


BAD_INPUTS = [v for k, v in dict(globals()).items() if k.startswith("bad_")]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.__name__[4:] for c in BAD_INPUTS])
def test_bad_input_clear_error_nothing_written(tmp_path, case):
    args, expected = case(tmp_path)
    before = snapshot(tmp_path)
    message = fails(*FIT, *args)
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"
    written = snapshot(tmp_path) - before
    if getattr(case, "keeps_cache", False):
        [cache] = [tmp_path / p for p in written if p.endswith(".pt")]
        assert sources._read_cache(cache) is not None and written == {
            str(cache.parent.relative_to(tmp_path)),
            str(cache.relative_to(tmp_path)),
        }
    else:
        assert written == set()  # no cache, no extracted folder, no log folder, no temporary file


def test_docs_table_has_one_row_per_bad_input():
    rows = re.findall(
        r"test_bad_input_clear_error_nothing_written\[(\w+)\]", (REPO / "docs/data.md").read_text()
    )
    assert sorted(rows) == sorted(case.__name__[4:] for case in BAD_INPUTS)


def test_train_script_refuses_bad_input_the_same_way(tmp_path):
    root = _image_folder(tmp_path)
    (root / "train" / "cat" / "0001.png").write_bytes(b"")
    before = snapshot(tmp_path)
    message = fails(sys.executable, str(REPO / "scripts/train.py"), "--accelerator=cpu", f"--data-dir={root}")
    assert f"{root / 'train' / 'cat' / '0001.png'}" in message and "corrupt or truncated" in message
    assert snapshot(tmp_path) == before


def test_failed_download_says_what_was_tried_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def offline(url, root, filename, md5):
        (Path(root) / filename).write_bytes(b"the first bytes of an archive")  # a download cut off
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(sources, "download_url", offline)
    data_dir = tmp_path / "new" / "data"
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--data.data_dir={data_dir}", "--trainer.accelerator=cpu", "--trainer.max_epochs=1"])
    message = str(exit_.value.code)
    assert message.startswith("error: could not download cifar10 from https://")
    assert "Temporary failure in name resolution" in message
    assert (
        f"Checked {data_dir}: no image folder, no cifar-10-batches-py/, no cifar-10-python.tar.gz" in message
    )
    assert f"put cifar-10-python.tar.gz in {data_dir}" in message and "train/<class>" in message
    assert "Traceback" not in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # not even the folders it made for the download


def test_user_error_in_datamodule_init_reaches_main():
    # LightningCLI builds the DataModule inside jsonargparse: the UserError must come through unwrapped.
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--data.batch_size=0", "--trainer.accelerator=cpu"])
    assert exit_.value.code == "error: batch_size must be at least 1, got 0."


def test_val_size_must_be_a_fraction_or_a_whole_count():
    with pytest.raises(UserError, match="whole count"):
        CIFARDataModule(val_size=2.5)
    assert CIFARDataModule(val_size=5000.0).hparams.val_size == 5000.0  # flat flags give floats


def test_archive_in_read_only_folder(tmp_path, batches):
    archive, md5s = write_archive(batches[0], tmp_path / "placed")
    archive.parent.chmod(0o555)
    try:
        with pytest.raises(UserError, match="is read-only: extract it yourself"):
            sources.prepare(str(archive.parent), checksums=md5s)
        assert [p.name for p in archive.parent.iterdir()] == ["cifar-10-python.tar.gz"]
    finally:
        archive.parent.chmod(0o755)


# ---------------------------------------------------------------------------- cache


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pt"))


def test_changed_folder_is_decoded_again(image_folder):
    cache = image_folder / ".lit-cifar-cache"
    sources.prepare(str(image_folder))  # hands its key to the next load only, as in a Lightning start
    first = sources.load(image_folder)
    assert len(cache_files(cache)) == 2  # one per split: train and test
    Image.new("RGB", (32, 32), (7, 7, 7)).save(image_folder / "train" / "cat" / "0000.png")  # rewritten
    second = sources.load(image_folder)
    assert (second["train"][0][0] == 7).all() and not (first["train"][0][0] == 7).all()
    Image.new("RGB", (32, 32)).save(image_folder / "train" / "dog" / "extra.png")  # added
    third = sources.load(image_folder)
    assert len(third["train"][1]) == len(first["train"][1]) + 1
    assert len(cache_files(cache)) == 2  # the caches of earlier contents are dropped


def test_damaged_cache_is_ignored_and_rebuilt(image_folder):
    first = sources.load(image_folder, splits=("train",))
    [cache] = cache_files(image_folder / ".lit-cifar-cache")
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])  # as if cut off mid-write
    again = sources.load(image_folder, splits=("train",))
    assert torch.equal(again["train"][0], first["train"][0])
    assert sources._read_cache(cache) is not None  # written whole again


def test_interrupted_cache_write_leaves_nothing(image_folder, monkeypatch):
    def killed(obj, f):
        f.write(b"the first part of a cache")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        sources.load(image_folder)
    assert list((image_folder / ".lit-cifar-cache").iterdir()) == []


def test_leftovers_of_a_killed_run_are_swept(image_folder):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    cache = image_folder / ".lit-cifar-cache"
    cache.mkdir()
    leftover = cache / f".lit-cifar-tmp-{socket.gethostname()}-{dead.stdout.strip()}-x1"
    leftover.write_bytes(b"half a cache")
    running = cache / f".lit-cifar-tmp-{socket.gethostname()}-{os.getpid()}-x2"  # a live writer's file
    running.write_bytes(b"being written")
    sources.load(image_folder)
    assert not leftover.exists() and running.exists() and len(cache_files(cache)) == 2


def test_read_only_data_folder_caches_in_user_folder(image_folder, monkeypatch):
    before = snapshot(image_folder)
    image_folder.chmod(0o555)  # chmod a-w: we run as root, so the mode bits decide
    try:
        first = sources.load(image_folder)
        assert len(cache_files(Path(os.environ["XDG_CACHE_HOME"]) / "lit-cifar")) == 2

        def no_decoding(*listing):
            raise AssertionError("decoded again despite the cache")

        monkeypatch.setattr(sources, "_read_folder", no_decoding)
        assert torch.equal(sources.load(image_folder)["train"][0], first["train"][0])
    finally:
        image_folder.chmod(0o755)
    assert snapshot(image_folder) == before


# ---------------------------------------------------------------------------- split


def test_split_is_the_same_on_every_machine():
    # Pinned values: a torch that permuted differently would move images between train and val.
    train, val = split_indices(50_000, 0.1, seed=0)
    assert (len(train), len(val)) == (45_000, 5_000)
    assert val[:8].tolist() == [1, 11, 23, 39, 44, 53, 65, 66]


def test_split_does_not_depend_on_the_loader_settings(image_folder):
    runs = [loaded(image_folder, fast=f, num_workers=w) for f, w in ((True, 0), (False, 0), (False, 2))]
    for dm in runs[1:]:  # later runs read the cache the first one wrote: stable across runs too
        for split in ("train", "val"):
            assert torch.equal(dm.data[split][0], runs[0].data[split][0])
            assert torch.equal(dm.data[split][1], runs[0].data[split][1])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_shard_the_train_split_disjointly(world_size):
    """Training: each epoch one permutation, the same on every rank, and rank r takes every world_size-th
    index, dropping at most world_size - 1 images so that no rank waits at the last step. Evaluation:
    every image exactly once."""
    n = 11
    labels = torch.arange(n)  # each label names its image
    images = labels.view(n, 1, 1, 1).expand(n, 3, 2, 2).to(torch.uint8)

    def shards(shuffle: bool, epochs: int) -> list[list[torch.Tensor]]:
        """Each epoch's label of every image each rank reads: [epoch][rank]."""
        ranks = [
            TensorLoader(images, labels, 2, shuffle, seed=3, rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        out = []
        for _ in range(epochs):
            out.append([])
            for loader in ranks:
                read = list(loader)
                assert len(read) == len(loader)
                assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y in read)  # images travel with labels
                out[-1].append(torch.cat([y for _, y in read]))
        return out

    train = shards(shuffle=True, epochs=2)
    for parts in train:
        union = torch.cat(parts).tolist()
        assert len(set(union)) == len(union) == n - n % world_size  # disjoint, all but n % world_size
        assert {len(p) for p in parts} == {n // world_size}  # equally long
    assert not torch.equal(train[0][0], train[1][0])  # a new order each epoch
    [evaluation] = shards(shuffle=False, epochs=1)
    assert sorted(torch.cat(evaluation).tolist()) == list(range(n))


# ---------------------------------------------------------------------------- bad data, file by file


def make_entry(kind: str, path: Path) -> None:
    """Make `path` a file system entry of `kind`, none of them a regular file."""
    if kind == "named_pipe":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(os.path.relpath(path))  # relative: socket paths are limited to ~100 characters
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "broken_link":
        path.symlink_to("nowhere.png")
    elif kind == "link_loop":
        path.symlink_to(path.name)
    elif kind == "folder":
        path.mkdir()


NOT_REGULAR = {
    "named_pipe": "a named pipe",
    "socket": "a socket",
    "device": "a device",
    "broken_link": "a broken symbolic link (to nowhere.png)",
    "link_loop": "a symbolic link loop",
    "folder": "a folder; class folders hold images, not folders",
}


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_only_regular_files_are_read(image_folder, kind):
    bad = image_folder / "train" / "dog" / "x.jpg"
    make_entry(kind, bad)
    with pytest.raises(UserError) as err:  # a named pipe that were opened would block here for ever
        sources.prepare(str(image_folder))
    assert str(err.value) == (
        f"1 file(s) in {image_folder / 'train'} are not regular files: {bad} ({NOT_REGULAR[kind]}). "
        f"Replace each with a regular PNG/JPEG file, or move it out."
    )
    assert not (image_folder / ".lit-cifar-cache").exists()
    # Prediction: the same entry named directly, or found in a folder, is refused before anything is read.
    if kind == "folder":  # among a prediction's inputs, a folder is searched for images
        return
    for given in ([str(bad)], [str(bad.parent)]):
        with pytest.raises(UserError, match=re.escape(f"are not regular files: {bad} ({NOT_REGULAR[kind]})")):
            find_images(given)


@functools.cache
def huge_png() -> bytes:
    """A 20000x20000 PNG of 48 KB: 400 megapixels, 1.2 GB once decoded to RGB."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_size_is_checked_from_the_header_before_decoding(image_folder, monkeypatch):
    huge = image_folder / "train" / "cat" / "huge.png"
    huge.write_bytes(huge_png())
    big = image_folder / "train" / "dog" / "big.png"
    Image.new("RGB", (3000, 2000)).save(big)
    real_load = ImageFile.ImageFile.load

    def load(self):
        assert self.size == (32, 32), f"decoded a {self.size} image"
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(UserError) as err:
        sources.prepare(str(image_folder))
    assert str(err.value).startswith(
        f"2 file(s) in {image_folder / 'train'} are not 32x32: {huge} (over 89,478,485 pixels), {big} (3000x2000). "
        f"Training data is never resized silently"
    )
    assert not (image_folder / ".lit-cifar-cache").exists()


def test_prediction_refuses_images_too_big_to_decode_safely(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(huge_png())
    with pytest.raises(images.BadFile) as err:
        read_image(huge)
    assert err.value.what == "are too big to decode safely"
    # In a prediction run it is skipped, with its reason (and the run exits non-zero: SKIPPED_EXIT).
    _, _, reason = ImageFiles([huge])[0]
    assert reason == (
        "over 89,478,485 pixels: Images over 89,478,485 pixels (Pillow's guard against decompression "
        "bombs) are refused: shrink them first."
    )
    Image.new("RGB", (3000, 2000), (10, 20, 30)).save(tmp_path / "photo.png")  # a big photo is fine
    assert (
        read_image(tmp_path / "photo.png").tolist()
        == torch.tensor([10, 20, 30]).view(3, 1, 1).expand(3, 32, 32).tolist()
    )


def sample_image(mode: str) -> Image.Image:
    """A 32x32 image in `mode` whose pixels all differ (a gradient per channel)."""
    i = np.arange(32 * 32).reshape(32, 32)
    rgb = Image.fromarray(np.stack([i % 256, (i * 7) % 256, 255 - i % 256], axis=2).astype(np.uint8))
    if mode == "I;16":
        return Image.fromarray((i * 64).astype(np.uint16))  # 0 ... 65472: every pixel over 255
    if mode == "P":
        return rgb.quantize(64)
    return rgb.convert(mode)


def reference(path: Path) -> torch.Tensor:
    """The pixels a careful reader expects, straight from PIL: 16-bit scaled by 2^8, the rest PIL's RGB."""
    img = ImageOps.exif_transpose(Image.open(path))
    if img.mode == "I;16":
        rgb = np.repeat((np.asarray(img) >> 8).astype(np.uint8)[..., None], 3, axis=2)
    else:
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]


@pytest.mark.parametrize(
    "mode, fmt", [(m, "png") for m in MODES] + [("L", "jpg"), ("RGB", "jpg"), ("CMYK", "jpg")]
)
def test_every_mode_becomes_the_same_8bit_rgb_in_training_and_prediction(tmp_path, monkeypatch, mode, fmt):
    path = tmp_path / f"x.{fmt}"
    sample_image(mode).save(path)
    assert Image.open(path).mode == mode
    x = images.decode(path)  # what training and evaluation read (through the cache)
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert torch.equal(x, reference(path))
    assert torch.equal(read_image(path), x)  # prediction reads the very same pixels
    monkeypatch.setattr(images, "_torchvision_decode", lambda p: None)  # PIL alone agrees
    assert torch.equal(images.decode(path), x)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(image_folder):
    ramp = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64  # 0 ... 65472
    Image.fromarray(ramp).save(image_folder / "train" / "cat" / "0000.png")  # mode I;16
    big_endian = Image.frombytes("I;16B", (32, 32), ramp.astype(">u2").tobytes())
    big_endian.save(image_folder / "train" / "dog" / "0000.png")
    Image.fromarray(ramp.astype(np.int32)).save(
        image_folder / "train" / "ship" / "0000.png", format="TIFF"
    )  # I
    x, _ = sources.load(image_folder, splits=("train",))["train"]
    expected = torch.from_numpy((ramp >> 8).astype(np.uint8)).expand(3, 32, 32)
    for i in (0, 20, 40):  # the first image of each class
        assert torch.equal(x[i], expected)
    assert len(x[0].unique()) == 256  # not clipped: every 8-bit level is there


def test_unsupported_pixel_formats_are_refused_by_name(image_folder):
    train = image_folder / "train"
    Image.new("F", (32, 32), 0.5).save(train / "cat" / "float.png", format="TIFF")  # no fixed range
    Image.fromarray(np.full((32, 32), -5, np.int32)).save(train / "dog" / "neg.png", format="TIFF")
    with pytest.raises(UserError) as err:
        sources.prepare(str(image_folder))
    assert str(err.value) == (
        f"2 file(s) in {train} have a pixel format lit-cifar does not convert: {train / 'cat/float.png'} "
        f"(mode F), {train / 'dog/neg.png'} (mode I with values outside 0-65535). "
        f"Save them as 8- or 16-bit RGB or grayscale PNG/JPEG."
    )


def test_exif_orientation_is_applied_alike_in_training_and_prediction(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(np.asarray(sample_image("RGB"))[:, :16].repeat(2, axis=1)).save(path, exif=exif)
    x = images.decode(path)
    raw = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(x, reference(path)) and not torch.equal(x, raw)  # turned upright
    assert torch.equal(read_image(path), x)


def test_unreadable_files_and_folders(tmp_path):
    # Tests run as root, whom permissions do not stop: read as the unprivileged user instead.
    root = write_image_folder(Path(tempfile.mkdtemp()), per_class=4, test_per_class=0)
    try:
        root.chmod(0o755)
        (root / "train" / "cat" / "0001.png").chmod(0)
        with unprivileged(), pytest.raises(UserError) as err:
            sources.prepare(str(root))
        assert str(err.value) == (
            f"1 file(s) in {root / 'train'} could not be read: {root / 'train/cat/0001.png'} "
            f"(Permission denied). Make them readable (chmod a+r), or move them out."
        )
        (root / "train" / "dog").chmod(0)
        with unprivileged(), pytest.raises(UserError) as err:
            sources.prepare(str(root))
        assert (
            str(err.value)
            == f"cannot list {root / 'train/dog'} (Permission denied): make it a readable folder."
        )
        assert not (root / ".lit-cifar-cache").exists()
    finally:
        shutil.rmtree(root)


@contextlib.contextmanager
def unprivileged():
    """Act as user nobody (65534) while root, so that file permissions apply."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


# ---------------------------------------------------------------------------- one split at a time


def decoded_files(monkeypatch) -> list[Path]:
    """The files images.decode is asked for, from now on."""
    seen, real = [], images.decode
    monkeypatch.setattr(sources, "decode", lambda path, size=(32, 32): seen.append(path) or real(path, size))
    return seen


def test_test_and_validate_decode_only_their_split(image_folder, monkeypatch):
    seen = decoded_files(monkeypatch)
    model = CIFARClassifier(num_classes=3, class_names=CLASSES)
    dm = CIFARDataModule(str(image_folder), val_size=6)
    quiet_trainer().test(model, datamodule=dm)
    assert len(seen) == 12 and {p.parent.parent.name for p in seen} == {"test"}
    seen.clear()
    quiet_trainer().validate(model, datamodule=CIFARDataModule(str(image_folder), val_size=6))
    assert len(seen) == 60 and {p.parent.parent.name for p in seen} == {"train"}
    # One cache per split: changing a test image decodes test/ again, not train/.
    seen.clear()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image_folder / "test" / "dog" / "0000.png")
    data = sources.load(image_folder)
    assert [p.parent.parent.name for p in seen] == ["test"] * 12
    assert (data["test"][0][4] == torch.tensor([1, 2, 3]).view(3, 1, 1)).all()
    assert sorted(p.name.split("-")[2] for p in cache_files(image_folder / ".lit-cifar-cache")) == [
        "test",
        "train",
    ]


def test_fit_checks_the_test_split_before_training(image_folder):
    (image_folder / "test" / "ship" / "0002.png").write_bytes(b"")
    with pytest.raises(UserError, match=re.escape(f"{image_folder / 'test' / 'ship' / '0002.png'} (empty")):
        CIFARDataModule(str(image_folder)).prepare_data()  # what `fit` runs before any training step


def test_cli_test_on_a_folder_with_only_test(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "only-test", per_class=0, test_per_class=3)
    seen = decoded_files(monkeypatch)
    cli = LitCifarCLI(args=[f"--data.data_dir={root}", "--trainer.accelerator=cpu"], run=False)
    assert cli.model.hparams.class_names == CLASSES  # from test/'s class folders
    [result] = cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert 0 <= result["test/acc"] <= 1 and len(seen) == 9
    assert not cli.datamodule.data.get("train")


# ---------------------------------------------------------------------------- bad data, end to end (in-process)
# Each case: (arguments after `lit-cifar`, what the one error line must say). docs/reliability.md "Bad data".


def _entry_case(kind: str, name: str = ""):
    def case(tmp):
        root = _image_folder(tmp)
        make_entry(kind, root / "train" / "cat" / "x.jpg")
        return ["fit", f"--data.data_dir={root}"], [
            f"{root / 'train' / 'cat' / 'x.jpg'} ({NOT_REGULAR[kind]})",
            "are not regular files",
            "Replace each with a regular PNG/JPEG file, or move it out.",
        ]

    case.__name__ = f"hostile_{name or kind}"
    return case


hostile_named_pipe = _entry_case("named_pipe")
hostile_socket = _entry_case("socket")
hostile_device = _entry_case("device")
hostile_broken_link = _entry_case("broken_link")
hostile_link_loop = _entry_case("link_loop")
hostile_folder_in_class_folder = _entry_case("folder", "folder_in_class_folder")


def hostile_file_among_class_folders(tmp):
    root = _image_folder(tmp)
    Image.new("RGB", (32, 32)).save(root / "train" / "stray.png")
    return ["fit", f"--data.data_dir={root}"], [
        f"{root / 'train'} must hold only class folders, but holds {root / 'train' / 'stray.png'} (a file)",
        "move images into a class folder",
    ]


def hostile_train_is_a_file(tmp):
    (tmp / "images").mkdir()
    (tmp / "images" / "train").write_text("not a folder")
    return ["fit", f"--data.data_dir={tmp / 'images'}"], [
        f"{tmp / 'images' / 'train'} is a file: make it a folder of class folders"
    ]


def hostile_one_class(tmp):
    root = _image_folder(tmp)
    shutil.rmtree(root / "train" / "dog")
    shutil.rmtree(root / "train" / "ship")
    return ["fit", f"--data.data_dir={root}"], [
        f"{root / 'train'} holds 1 class folder(s) ['cat']: a classifier needs at least two"
    ]


def hostile_zero_byte_file(tmp):
    root = _image_folder(tmp)
    (root / "train" / "dog" / "0001.png").write_bytes(b"")
    return ["fit", f"--data.data_dir={root}"], [
        f"{root / 'train' / 'dog' / '0001.png'} (empty: 0 bytes)",
        "corrupt or truncated",
    ]


def hostile_truncated_jpeg(tmp):
    root = _image_folder(tmp)
    jpeg = root / "train" / "dog" / "0001.jpg"
    (root / "train" / "dog" / "0001.png").unlink()
    sample_image("RGB").save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:-300])
    return ["fit", f"--data.data_dir={root}"], [f"{jpeg} (image file is truncated", "corrupt or truncated"]


def hostile_huge_png(tmp):
    root = _image_folder(tmp)
    (root / "train" / "cat" / "huge.png").write_bytes(huge_png())
    return ["fit", f"--data.data_dir={root}"], [
        f"are not 32x32: {root / 'train' / 'cat' / 'huge.png'} (over 89,478,485 pixels)"
    ]


def hostile_float_pixels(tmp):
    root = _image_folder(tmp)
    Image.new("F", (32, 32), 0.5).save(root / "train" / "cat" / "float.png", format="TIFF")
    return ["fit", f"--data.data_dir={root}"], [
        f"does not convert: {root / 'train' / 'cat' / 'float.png'} (mode F)"
    ]


def hostile_fit_on_a_test_only_folder(tmp):
    root = write_image_folder(tmp / "images", per_class=0, test_per_class=2)
    return ["fit", f"--data.data_dir={root}"], [f"{root} has no train/ folder", "run `lit-cifar test`"]


def hostile_test_without_test_folder(tmp):
    root = _image_folder(tmp)
    return ["test", f"--data.data_dir={root}"], [f"{root} has no test/ folder", "run `validate`"]


def hostile_data_dir_one_level_too_high(tmp):
    _image_folder(tmp)
    return ["fit", f"--data.data_dir={tmp}"], [f"{tmp / 'images'} holds an image folder: point data_dir at"]


def hostile_data_dir_is_the_train_folder(tmp):
    root = _image_folder(tmp)
    return ["fit", f"--data.data_dir={root / 'train'}"], [
        f"{root / 'train'} is the train/ folder of an image folder: point data_dir at {root}."
    ]


def hostile_class_folders_without_train(tmp):
    root = _image_folder(tmp)
    (root / "train").rename(tmp / "classes")
    root.rmdir()
    return ["fit", f"--data.data_dir={tmp / 'classes'}"], [
        f"{tmp / 'classes'} holds folders of images (cat/) but no train/ or test/ folder",
        f"move the class folders into {tmp / 'classes' / 'train'}",
    ]


HOSTILE = [v for k, v in dict(globals()).items() if k.startswith("hostile_")]


def refusal(args: list[str]) -> str:
    """The error line for `lit-cifar *args`, found as the CLI finds it, without starting a Trainer."""
    command, data_dir = args[0], args[1].removeprefix("--data.data_dir=")
    with pytest.raises(UserError) as err:
        assert CIFARDataModule(data_dir).classes  # read first by the CLI, to size the model
        sources.prepare(data_dir, split="test" if command == "test" else "train")  # then prepare_data()
    return f"error: {err.value}"


@pytest.mark.parametrize("case", HOSTILE, ids=[c.__name__[8:] for c in HOSTILE])
def test_bad_data_one_line_nothing_written(tmp_path, case):
    args, expected = case(tmp_path)
    before = snapshot(tmp_path)
    message = refusal(args)
    assert "\n" not in message, message
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"
    assert snapshot(tmp_path) == before  # no cache, no extracted folder, no temporary file


@pytest.mark.parametrize(
    "case",
    [hostile_named_pipe, hostile_one_class, hostile_test_without_test_folder],
    ids=lambda c: c.__name__[8:],
)
def test_bad_data_through_the_cli(tmp_path, capsys, case):
    args, _ = case(tmp_path)
    expected = refusal(args)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # the named pipe: never opened, so no hang
        main([*args, "--trainer.accelerator=cpu", "--trainer.max_epochs=1"])
    assert exit_.value.code == expected
    assert "Traceback" not in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # nor lightning_logs, checkpoints or config.yaml


def test_docs_have_one_bad_data_row_per_case():
    text = (REPO / "docs/reliability.md").read_text()
    section = text[text.index("## Bad data") :]
    rows = re.findall(r"test_bad_data_one_line_nothing_written\[(\w+)\]", section)
    assert sorted(rows) == sorted(case.__name__[8:] for case in HOSTILE)
