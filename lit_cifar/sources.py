"""CIFAR on disk, in every form a user holds it, decoded once into uint8 tensors and cached.

Looked for in `data_dir`, in this order:
  train/<class>/*.png|jpg (+ optional test/<class>/...)   an image folder (classes: sorted names)
  cifar-10-batches-py/ | cifar-100-python/                 extracted pickles, md5-verified
  cifar-10-python.tar.gz | cifar-100-python.tar.gz         the archive: verified, then extracted
  nothing: torchvision downloads the archive (when allowed)

    python -c "from lit_cifar.sources import load; print(load('data')['train'][0].shape)"
"""

import hashlib
import os
import pickle
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_url

from lit_cifar.errors import UserError

DATASETS = {"cifar10": CIFAR10, "cifar100": CIFAR100}  # torchvision holds the names and md5s
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_VERSION = "1"  # bump when the cached layout changes
Split = tuple[torch.Tensor, torch.Tensor]  # uint8 (N, 3, 32, 32), int64 (N,)


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def is_image_folder(data_dir: str) -> bool:
    return (Path(data_dir) / "train").is_dir()


def folder_classes(root: Path) -> list[str]:
    return [p.name for p in _visible(root) if p.is_dir()]


def _supply_by_hand(data_dir: Path, dataset: str) -> str:
    tv = DATASETS[dataset]
    return (
        f"Supply the data by hand, then run again:\n"
        f"  1. put {tv.filename} in {data_dir} (it is verified and extracted), or\n"
        f"  2. put the extracted {tv.base_folder}/ folder in {data_dir}, or\n"
        f"  3. point data_dir at an image folder: train/<class>/*.png|jpg (optional test/<class>/)."
    )


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expected_md5s(dataset: str) -> dict[str, str]:
    """The official checksums, by file name: the archive and each file inside it."""
    tv = DATASETS[dataset]
    files = dict(tv.train_list + tv.test_list)
    files[tv.meta["filename"]] = tv.meta["md5"]
    files[tv.filename] = tv.tgz_md5
    return files


# ---------------------------------------------------------------------------- fetch (rank 0)


def prepare(data_dir: str, dataset: str, download: bool, checksums: dict[str, str]) -> None:
    """Make sure extracted data is in `data_dir`: extract a placed archive, or download one."""
    root = Path(data_dir).expanduser().resolve()
    tv = DATASETS[dataset]
    if is_image_folder(data_dir) or (root / tv.base_folder).is_dir():
        return
    archive = root / tv.filename
    if not archive.exists():
        if not download:
            raise UserError(
                f"no {dataset} data in {root} and download is off.\n" + _supply_by_hand(root, dataset)
            )
        _download(root, dataset, checksums)
    _extract(archive, checksums)


def _download(root: Path, dataset: str, checksums: dict[str, str]) -> None:
    tv = DATASETS[dataset]
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:  # a broken download leaves nothing behind
            download_url(tv.url, tmp, tv.filename, checksums[tv.filename])
            os.replace(Path(tmp) / tv.filename, root / tv.filename)
    except Exception as err:  # noqa: BLE001 - any failure here means the same thing to the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"could not download {dataset} from {tv.url} ({reason}).\n"
            f"Checked {root}: no image folder, no {tv.base_folder}/, no {tv.filename}.\n"
            + _supply_by_hand(root, dataset)
        ) from None


def _extract(archive: Path, checksums: dict[str, str]) -> None:
    if md5(archive) != checksums[archive.name]:
        raise UserError(
            f"{archive} fails its md5 check (truncated or altered): delete it and download or copy it again."
        )
    with tempfile.TemporaryDirectory(dir=archive.parent) as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        for item in Path(tmp).iterdir():  # move the folder in whole, so a kill leaves no half copy
            os.replace(item, archive.parent / item.name)


# ---------------------------------------------------------------------------- decode (every rank)


def load(data_dir: str, dataset: str = "cifar10", checksums: dict[str, str] | None = None) -> dict:
    """{"train": (x, y), "test": (x, y) or None, "classes": [...]}, from the cache when it is current."""
    root = Path(data_dir).expanduser().resolve()
    checksums = checksums or expected_md5s(dataset)
    if is_image_folder(data_dir):
        key, read = _folder_key(root), lambda: _read_folder(root)
    else:
        key, read = _batches_key(root, dataset, checksums), lambda: _read_batches(root, dataset)
    return _cached(root, key, read)


def _cached(root: Path, key: str, read) -> dict:
    for folder in _cache_dirs(root):
        path = folder / f"{key}.pt"
        if path.exists():
            try:
                return torch.load(path, weights_only=True)
            except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
                pass
    data = read()
    for folder in _cache_dirs(root):
        if _save_atomic(data, folder / f"{key}.pt"):
            break
    return data


def _save_atomic(data: dict, path: Path) -> bool:
    """Write to a temporary file, then rename: a kill leaves the old state, never a half file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            torch.save(data, f)
        os.replace(tmp, path)
        return True
    except OSError:  # read-only folder: the caller tries the next place
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return False


def _cache_dirs(root: Path) -> list[Path]:
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lit-cifar"
    # A folder without write bits is read-only to us even as root (who may write anyway).
    writable = os.access(root, os.W_OK) and root.stat().st_mode & 0o200
    return [root / ".lit-cifar-cache", user] if writable else [user]


def _folder_key(root: Path) -> str:
    # Names, sizes and modification times: any change to the folder makes a new key.
    h = hashlib.sha1(f"{CACHE_VERSION}\0{root}".encode())
    for split in ("train", "test"):
        for dirpath, dirnames, filenames in os.walk(root / split):
            dirnames.sort()
            for name in sorted(filenames):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{dirpath}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "folder-" + h.hexdigest()[:20]


def _batches_key(root: Path, dataset: str, checksums: dict[str, str]) -> str:
    # Verifying every file is the key: the md5s themselves name the content.
    tv = DATASETS[dataset]
    folder = root / tv.base_folder
    if not folder.is_dir():
        raise UserError(f"no {dataset} data in {root}.\n" + _supply_by_hand(root, dataset))
    names = [name for name, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]
    for name in names:
        path = folder / name
        if not path.exists():
            raise UserError(f"{path} is missing: copy the whole {tv.base_folder}/ folder again.")
        if md5(path) != checksums[name]:
            raise UserError(
                f"{path} fails its md5 check (truncated or altered): "
                f"delete {folder} and supply the data again."
            )
    digest = hashlib.sha1(
        f"{CACHE_VERSION}\0{dataset}".encode() + "".join(checksums[n] for n in names).encode()
    )
    return f"{dataset}-" + digest.hexdigest()[:20]


def _read_batches(root: Path, dataset: str) -> dict:
    tv = DATASETS[dataset]
    folder = root / tv.base_folder

    def read(names: list[str]) -> Split:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as f:  # safe: the file passed its md5 check above
                entry = pickle.load(f, encoding="latin1")
            xs.append(torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            ys.append(torch.as_tensor(entry.get("labels", entry.get("fine_labels")), dtype=torch.int64))
        return torch.cat(xs), torch.cat(ys)

    with open(folder / tv.meta["filename"], "rb") as f:
        classes = list(pickle.load(f, encoding="latin1")[tv.meta["key"]])
    train = read([name for name, _ in tv.train_list])
    test = read([name for name, _ in tv.test_list])
    return {"train": train, "test": test, "classes": classes}


def _read_folder(root: Path) -> dict:
    classes = folder_classes(root / "train")
    if not classes:
        raise UserError(f"{root / 'train'} holds no class folders: expected train/<class>/*.png|jpg.")
    test = None
    if (root / "test").is_dir():
        test_classes = folder_classes(root / "test")
        if test_classes != classes:
            raise UserError(
                f"{root / 'train'} and {root / 'test'} have different class folders "
                f"(only in train: {sorted(set(classes) - set(test_classes))}, "
                f"only in test: {sorted(set(test_classes) - set(classes))}): make them the same."
            )
        test = _read_split(root / "test", classes)
    return {"train": _read_split(root / "train", classes), "test": test, "classes": classes}


def _read_split(split_dir: Path, classes: list[str]) -> Split:
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _visible(split_dir / name)
        if not files:
            raise UserError(f"{split_dir / name} holds no images: add PNG/JPEG files or remove the folder.")
        paths += files
        labels += [label] * len(files)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        images = list(pool.map(_decode, paths))
    wrong = [str(p) for p, img in zip(paths, images, strict=True) if img.shape != (3, 32, 32)]
    if wrong:
        raise UserError(
            f"{len(wrong)} image(s) are not 32x32, e.g. {', '.join(wrong[:3])}: training data is never "
            f"resized silently; resize them to 32x32 first (prediction accepts any size)."
        )
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _decode(path: Path) -> torch.Tensor:
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        raise UserError(f"{path} is not a PNG or JPEG image: remove it from the image folder.")
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))  # grayscale/RGBA -> RGB; (H, W, 3) uint8
    except Exception:  # noqa: BLE001 - decoders raise many types; all mean a bad file
        raise UserError(
            f"{path} is not a readable image (corrupt or truncated): replace or remove it."
        ) from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # (3, H, W)
