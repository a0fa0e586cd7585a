"""CIFAR on disk, in every form a user holds it, checked and decoded once into a cache of uint8 tensors.

Looked for in `data_dir`, in this order (docs/data.md: the table, every error message and its test):
  train/<class>/*.png|jpg (+ optional test/<class>/)   an image folder (classes: sorted folder names)
  cifar-10-batches-py/ | cifar-100-python/             the pickles, md5-verified and read by torchvision
  cifar-10-python.tar.gz | cifar-100-python.tar.gz     the archive: md5-verified, then extracted
  nothing                                              torchvision downloads the archive (when allowed)

`prepare` (once per machine) fetches what is missing and fills one split's cache; `load` (every process)
reads the caches. Every write goes to a temporary folder first and is renamed into place.

    python -c "from lit_cifar.sources import load; print(load('data', splits=('train',))['train'][0].shape)"
"""

import contextlib
import hashlib
import os
import shutil
import socket
import tarfile
import tempfile
from functools import partial
from pathlib import Path

import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_url

from lit_cifar.errors import UserError
from lit_cifar.images import BadFile, decode, is_image_folder, list_folder, misplaced_images, refuse

DATASETS = {"cifar10": CIFAR10, "cifar100": CIFAR100}  # torchvision's classes: file names, URL, md5s
CACHE_VERSION = "3"  # bump when the cached layout changes
Split = tuple[torch.Tensor, torch.Tensor]  # uint8 (N, 3, 32, 32), int64 (N,)
# CIFAR-100's fine labels in label order (as in its `meta` file), known before any download.
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark
shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
BY_HAND = """Supply the data by hand, then run again:
  1. put {tv.filename} in {root} (it is verified and extracted), or
  2. put the extracted {tv.base_folder}/ folder in {root}, or
  3. point data_dir at an image folder: train/<class>/*.png|jpg (optional test/<class>/)."""
_TMP = f".lit-cifar-tmp-{socket.gethostname()}-"  # + the writer's pid: a later run can tell it died


def has_test(data_dir: str | Path) -> bool:
    """CIFAR's pickles always have a test split; an image folder has one when it holds test/."""
    return not is_image_folder(data_dir) or os.path.lexists(Path(data_dir).expanduser() / "test")


def expected_md5s(dataset: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The official md5s by file name (the archive and each file in it), updated by `overrides`."""
    tv = DATASETS[dataset]
    official = dict(
        tv.train_list + tv.test_list, **{tv.meta["filename"]: tv.meta["md5"], tv.filename: tv.tgz_md5}
    )
    return official | (overrides or {})


def prepare(
    data_dir: str,
    dataset: str = "cifar10",
    download: bool = True,
    checksums: dict | None = None,
    split: str = "train",
) -> dict:
    """Fetch what is missing (extract a placed archive, or download one), check all, fill `split`'s cache:
    every problem with the data surfaces here, before a run writes anything. Returns `split` as `load` does."""
    root, tv = Path(data_dir).expanduser().resolve(), DATASETS[dataset]
    sums = expected_md5s(dataset, checksums)
    if root.exists() and not root.is_dir():
        raise UserError(f"data_dir {root} is a file: point data_dir at the folder that holds the data.")
    if not is_image_folder(root) and not (root / tv.base_folder).is_dir():
        if not (root / tv.filename).exists():
            misplaced_images(root)
            _download(root, dataset, sums, download)
        _extract(root / tv.filename, sums[tv.filename])
    return _split(root, dataset, sums, split)


def load(
    data_dir: str, dataset: str = "cifar10", checksums: dict | None = None, splits: tuple = ("train", "test")
) -> dict:
    """{split: (x, y) (None for a test split the data lack), "classes": [...]}, from the cache when current."""
    root, sums = Path(data_dir).expanduser().resolve(), expected_md5s(dataset, checksums)
    out = {}
    for split in splits:
        out |= _split(root, dataset, sums, split) if split == "train" or has_test(root) else {split: None}
    return out


def _download(root: Path, dataset: str, sums: dict[str, str], allowed: bool) -> None:
    tv = DATASETS[dataset]
    if not allowed:
        where = "does not exist" if not root.exists() else f"holds no {dataset} data"
        raise UserError(
            f"data_dir {root} {where} and download is off (--data.download false).\n"
            + BY_HAND.format(tv=tv, root=root)
        )
    created = [p for p in (root, *root.parents) if not p.exists()]  # removed again if this fails
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _scratch(root) as tmp:  # a broken download goes with tmp
            download_url(tv.url, tmp, tv.filename, sums[tv.filename])
            os.replace(tmp / tv.filename, root / tv.filename)
    except Exception as err:  # noqa: BLE001 - any failure here means the same thing to the user
        for folder in created:  # innermost first; rmdir removes only empty ones
            with contextlib.suppress(OSError):
                folder.rmdir()
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"could not download {dataset} from {tv.url} ({reason}).\n"
            f"Checked {root}: no image folder, no {tv.base_folder}/, no {tv.filename}.\n"
            + BY_HAND.format(tv=tv, root=root)
        ) from None


def _extract(archive: Path, md5: str) -> None:
    if not check_integrity(archive, md5):
        raise UserError(
            f"{archive} fails its md5 check (truncated or altered): delete it and download or copy it again."
        )
    if _read_only(archive.parent):
        raise UserError(
            f"{archive} must be extracted, but {archive.parent} is read-only: extract it yourself "
            f"(tar xzf {archive.name}) or copy it to a writable folder."
        )
    # tarfile's safety filter exists from Python 3.10.12/3.11.4; before, the md5 check alone vouches for it.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with _scratch(archive.parent) as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, **safe)
        for item in tmp.iterdir():  # moved in whole, so a kill leaves no half-extracted folder
            os.replace(item, archive.parent / item.name)


def _batch_files(root: Path, dataset: str) -> list[Path]:
    """Every file of the pickles, whichever split is read: a damaged test_batch stops `fit` before it starts."""
    tv = DATASETS[dataset]
    folder = root / tv.base_folder
    if not folder.is_dir():
        raise UserError(f"no {dataset} data in {root}.\n" + BY_HAND.format(tv=tv, root=root))
    files = [folder / name for name, _ in tv.train_list + tv.test_list] + [folder / tv.meta["filename"]]
    for path in files:
        if not path.is_file():
            raise UserError(f"{path} is missing: copy the whole {tv.base_folder}/ folder again.")
    return files


def _read_batches(root: Path, dataset: str, sums: dict[str, str], split: str) -> dict:
    """`split` read by torchvision, which first checks every file's md5 against `sums`."""
    tv = DATASETS[dataset]
    # torchvision keeps the md5s in class attributes: a subclass carries `sums` (for data you made).
    lists = {k: [(name, sums[name]) for name, _ in getattr(tv, k)] for k in ("train_list", "test_list")}
    checked = type(tv.__name__, (tv,), {**lists, "meta": {**tv.meta, "md5": sums[tv.meta["filename"]]}})
    try:
        data = checked(str(root), train=split == "train")
    except RuntimeError:  # "not found or corrupted": say which file
        for path in _batch_files(root, dataset):
            if not check_integrity(path, sums[path.name]):
                raise UserError(
                    f"{path} fails its md5 check (truncated or altered): "
                    f"delete {path.parent} and supply the data again."
                ) from None
        raise
    x = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return {"x": x, "y": torch.tensor(data.targets, dtype=torch.int64), "classes": list(data.classes)}


def _read_folder(split_dir: Path, classes: list[str], paths, labels, stats) -> dict:
    # One thread: each image is tiny, so decoding threads would mostly wait for the GIL.
    images, problems = [], []
    for path in paths:
        try:
            images.append(decode(path, size=(32, 32)))
        except BadFile as err:
            problems.append((path, err))
    refuse(split_dir, problems)
    return {"x": torch.stack(images), "y": torch.tensor(labels, dtype=torch.int64), "classes": classes}


def _split(root: Path, dataset: str, sums: dict[str, str], split: str) -> dict:
    """{split: (x, y), "classes": [...]}: from the cache when it is current, else read and cached."""
    if is_image_folder(root):
        listing = list_folder(root, split)  # (split folder, classes, paths, labels, stats)
        key = _key("folder", root, split, listing[2], listing[4], listing[1])
        read = partial(_read_folder, *listing)
    else:  # keyed by each file's size and time too: the md5s are checked only when the cache is not current
        files = _batch_files(root, dataset)
        key = _key(dataset, root, split, files, [p.stat() for p in files], sorted(sums.items()))
        read = partial(_read_batches, root, dataset, sums, split)
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lit-cifar"
    folders = [user] if _read_only(root) else [root / ".lit-cifar-cache", user]
    for folder in folders:
        if (data := _read_cache(folder / f"{key}.pt")) is not None:
            break
    else:  # no current cache: read the source, and cache it in the first folder that takes it
        data = read()
        for folder in folders:
            if _save(data, folder, key):
                break
    return {split: (data["x"], data["y"]), "classes": data["classes"]}


def _key(kind: str, root: Path, split: str, paths, stats, salt: object) -> str:
    """<kind>-<where>-<split>-<what>: a file added, removed, renamed or rewritten changes <what>."""
    h = hashlib.sha1(f"{CACHE_VERSION}\0{salt}".encode())
    for path, st in zip(paths, stats, strict=True):
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{kind}-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}-{split}-{h.hexdigest()[:16]}"


def _read_cache(path: Path) -> dict | None:
    """The cached data, or None when it is missing or damaged (a damaged cache is rebuilt, never trusted)."""
    try:  # mmap: pages are read when used, so a cache hit costs almost nothing until the split is copied
        data = torch.load(path, weights_only=True, mmap=True)
        x, y, classes = data["x"], data["y"], data["classes"]
        ok = x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and y.shape == (len(x),)
        return data if ok and all(isinstance(name, str) for name in classes) else None
    except Exception:  # noqa: BLE001 - any failure to read it means the same: rebuild
        return None


def _save(data: dict, folder: Path, key: str) -> bool:
    """Written whole or not at all (a kill or Ctrl+C leaves the old state); False when `folder` cannot take it.
    The caches of the split's earlier contents are dropped."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _scratch(folder) as tmp:
            with open(tmp / key, "wb") as f:
                torch.save(data, f)
            os.replace(tmp / key, folder / f"{key}.pt")
    except OSError:  # a full or read-only disk
        return False
    for old in folder.glob(key.rsplit("-", 1)[0] + "-*.pt"):
        if old.name != f"{key}.pt":
            with contextlib.suppress(OSError):  # in use elsewhere (Windows): the next run drops it
                old.unlink()
    return True


@contextlib.contextmanager
def _scratch(folder: Path):
    """A temporary folder in `folder` (renames out of it are atomic), removed afterwards; first, those that
    killed runs on this machine left there."""
    for old in folder.glob(_TMP + "*"):
        pid = old.name[len(_TMP) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=f"{_TMP}{os.getpid()}-") as tmp:
        yield Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except OSError as err:  # PermissionError: it does, as another user's
        return not isinstance(err, ProcessLookupError)
    return True


def _read_only(folder: Path) -> bool:
    # Without write bits a folder is read-only to us even as root (who could write anyway).
    return not (os.access(folder, os.W_OK) and folder.stat().st_mode & 0o200)
