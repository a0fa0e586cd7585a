"""CIFAR on disk, in every form a user holds it, decoded once into uint8 tensors and cached.

Looked for in `data_dir`, in this order:
  train/<class>/*.png|jpg (+ optional test/<class>/...)   an image folder (classes: sorted names)
  cifar-10-batches-py/ | cifar-100-python/                 extracted pickles, md5-verified
  cifar-10-python.tar.gz | cifar-100-python.tar.gz         the archive: verified, then extracted
  nothing: torchvision downloads the archive (when allowed)

`prepare` (once per machine) fetches, checks and decodes into the cache; `load` (every process)
reads the cache. Every write goes to a temporary name first and is renamed into place, so a killed
run leaves the old state, never a half file; its leftovers are swept up by the next run.

    python -c "from lit_cifar.sources import load; print(load('data')['train'][0].shape)"
"""

import hashlib
import os
import pickle
import shutil
import socket
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_url
from torchvision.io import ImageReadMode, decode_image, read_file

from lit_cifar.errors import UserError

DATASETS = {"cifar10": CIFAR10, "cifar100": CIFAR100}  # torchvision holds the names and md5s
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_VERSION = "2"  # bump when the cached layout changes
Split = tuple[torch.Tensor, torch.Tensor]  # uint8 (N, 3, 32, 32), int64 (N,)
# CIFAR-100's fine labels in label order (as in its `meta` file), known before any download.
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark
shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def _root(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser().resolve()


def is_image_folder(data_dir: str | Path) -> bool:
    return (Path(data_dir).expanduser() / "train").is_dir()


def folder_classes(root: str | Path) -> list[str]:
    return [p.name for p in _visible(Path(root).expanduser()) if p.is_dir()]


def _supply_by_hand(data_dir: Path, dataset: str) -> str:
    tv = DATASETS[dataset]
    return (
        f"Supply the data by hand, then run again:\n"
        f"  1. put {tv.filename} in {data_dir} (it is verified and extracted), or\n"
        f"  2. put the extracted {tv.base_folder}/ folder in {data_dir}, or\n"
        f"  3. point data_dir at an image folder: train/<class>/*.png|jpg (optional test/<class>/)."
    )


_MD5S: dict[tuple, str] = {}  # (path, inode, size, mtime) -> md5: prepare and load share one pass


def md5(path: Path) -> str:
    st = path.stat()
    known = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if known not in _MD5S:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _MD5S[known] = h.hexdigest()
    return _MD5S[known]


def expected_md5s(dataset: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The official checksums by file name (the archive and each file in it), updated by `overrides`."""
    tv = DATASETS[dataset]
    files = dict(tv.train_list + tv.test_list)
    files[tv.meta["filename"]] = tv.meta["md5"]
    files[tv.filename] = tv.tgz_md5
    return {**files, **(overrides or {})}


# ---------------------------------------------------------------------------- scratch space

_HOST = socket.gethostname()


def _scratch_prefix() -> str:
    """Names of this process's temporary files: a later run can tell whether their writer died."""
    return f".lit-cifar-tmp-{_HOST}-{os.getpid()}-"


def _sweep(folder: Path) -> None:
    """Remove temporary files left in `folder` by killed runs on this machine."""
    mine = f".lit-cifar-tmp-{_HOST}-"
    try:
        leftovers = [p for p in folder.iterdir() if p.name.startswith(mine)]
    except OSError:
        return
    for path in leftovers:
        pid = path.name[len(mine) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_only(folder: Path) -> bool:
    # Without write bits a folder is read-only to us even as root (who could write anyway).
    return not (os.access(folder, os.W_OK) and folder.stat().st_mode & 0o200)


# ---------------------------------------------------------------------------- fetch (once per machine)


def prepare(
    data_dir: str, dataset: str = "cifar10", download: bool = True, checksums: dict[str, str] | None = None
) -> int:
    """Fetch what is missing (extract a placed archive, or download one), check it, fill the cache.

    Every problem with the data surfaces here, before a run writes anything else.
    Returns the number of training images.
    """
    root = _root(data_dir)
    tv = DATASETS[dataset]
    sums = expected_md5s(dataset, checksums)
    if root.exists() and not root.is_dir():
        raise UserError(f"data_dir {root} is a file: point data_dir at the folder that holds the data.")
    if not is_image_folder(root) and not (root / tv.base_folder).is_dir():
        archive = root / tv.filename
        if not archive.exists():
            if not download:
                where = "does not exist" if not root.exists() else f"holds no {dataset} data"
                raise UserError(
                    f"data_dir {root} {where} and download is off (--data.download false).\n"
                    + _supply_by_hand(root, dataset)
                )
            _download(root, dataset, sums)
        _extract(archive, sums)
    key, read = _source(root, dataset, sums)
    _JUST_PREPARED[_handoff(root, dataset, sums)] = key
    return len(_cached(root, key, read)["train"][1])


def _download(root: Path, dataset: str, checksums: dict[str, str]) -> None:
    tv = DATASETS[dataset]
    created = [p for p in (root, *root.parents) if not p.exists()]  # removed again if this fails
    try:
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root)
        with tempfile.TemporaryDirectory(dir=root, prefix=_scratch_prefix()) as tmp:
            download_url(tv.url, tmp, tv.filename, checksums[tv.filename])  # a broken one dies with tmp
            os.replace(Path(tmp) / tv.filename, root / tv.filename)
    except Exception as err:  # noqa: BLE001 - any failure here means the same thing to the user
        for folder in created:  # innermost first; only folders this call made, and only if empty
            try:
                folder.rmdir()
            except OSError:
                break
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
    root = archive.parent
    if _read_only(root):
        raise UserError(
            f"{archive} must be extracted, but {root} is read-only: extract it yourself "
            f"(tar xzf {archive.name}) or copy it to a writable folder."
        )
    _sweep(root)
    with tempfile.TemporaryDirectory(dir=root, prefix=_scratch_prefix()) as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        for item in Path(tmp).iterdir():  # move the folder in whole, so a kill leaves no half copy
            os.replace(item, root / item.name)


# ---------------------------------------------------------------------------- decode (every process)


def load(data_dir: str, dataset: str = "cifar10", checksums: dict[str, str] | None = None) -> dict:
    """{"train": (x, y), "test": (x, y) or None, "classes": [...]}, from the cache when it is current."""
    root = _root(data_dir)
    sums = expected_md5s(dataset, checksums)
    # Lightning calls setup right after prepare_data: take the key prepare() just checked in this
    # process instead of reading every file's size and time again (0.4 s for 50,000 images). Once only.
    known = _JUST_PREPARED.pop(_handoff(root, dataset, sums), None)
    return _cached(root, *_source(root, dataset, sums, known))


_JUST_PREPARED: dict[tuple, str] = {}


def _handoff(root: Path, dataset: str, checksums: dict[str, str]) -> tuple:
    return root, dataset, tuple(sorted(checksums.items()))


def _source(
    root: Path, dataset: str, checksums: dict[str, str], key: str | None = None
) -> tuple[str, object]:
    """(cache key, function that reads the source) for what `root` holds."""
    if is_image_folder(root):
        return key or _folder_key(root), lambda: _read_folder(root)
    return key or _batches_key(root, dataset, checksums), lambda: _read_batches(root, dataset)


def _cached(root: Path, key: str, read) -> dict:
    for folder in _cache_dirs(root):
        data = _read_cache(folder / f"{key}.pt")
        if data is not None:
            return data
    data = read()
    for folder in _cache_dirs(root):
        if _save_atomic(data, folder, key):
            break
    return data


def _read_cache(path: Path) -> dict | None:
    """The cached data, or None when it is missing or damaged (a damaged cache is rebuilt, never trusted)."""
    if not path.exists():
        return None
    try:
        # mmap: pages are read when used, so a cache hit costs almost nothing until the split copies.
        data = torch.load(path, weights_only=True, mmap=True)
        splits = [data["train"]] + ([data["test"]] if data["test"] is not None else [])
        ok = all(
            x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and y.shape == (len(x),) for x, y in splits
        )
        return data if ok and all(isinstance(name, str) for name in data["classes"]) else None
    except Exception:  # noqa: BLE001 - any failure to read it means the same: rebuild
        return None


def _save_atomic(data: dict, folder: Path, key: str) -> bool:
    """Write to a temporary file, then rename: a kill leaves the old state, never a half file."""
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _sweep(folder)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=_scratch_prefix(), delete=False) as f:
            tmp = Path(f.name)
            torch.save(data, f)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # readable like any file the user writes, not 0600
        os.replace(tmp, folder / f"{key}.pt")
    except BaseException as err:  # a full or read-only disk, or Ctrl+C: leave nothing behind
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            return False  # the caller tries the next place
        raise
    # A changed image folder gets a new key: drop the caches of its earlier contents.
    if key.startswith("folder-"):
        for old in folder.glob(key.rsplit("-", 1)[0] + "-*.pt"):
            if old.name != f"{key}.pt":
                try:
                    old.unlink(missing_ok=True)
                except OSError:  # in use elsewhere (Windows): the next run drops it
                    pass
    return True


def _cache_dirs(root: Path) -> list[Path]:
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lit-cifar"
    return [user] if _read_only(root) else [root / ".lit-cifar-cache", user]


def _folder_key(root: Path) -> str:
    """folder-<where>-<what>: any file added, removed, renamed or rewritten changes <what>."""
    h = hashlib.sha1(CACHE_VERSION.encode())
    for split in ("train", "test"):
        for dirpath, dirnames, filenames in os.walk(root / split):
            dirnames.sort()
            for name in sorted(filenames):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{dirpath}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    where = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return f"folder-{where}-{h.hexdigest()[:16]}"


def _batches_key(root: Path, dataset: str, checksums: dict[str, str]) -> str:
    # Verifying every file is the key: the md5s themselves name the content.
    tv = DATASETS[dataset]
    folder = root / tv.base_folder
    if not folder.is_dir():
        raise UserError(f"no {dataset} data in {root}.\n" + _supply_by_hand(root, dataset))
    names = [name for name, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]
    for name in names:
        path = folder / name
        if not path.is_file():
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


def _examples(paths: list, n: int = 3) -> str:
    return ", ".join(str(p) for p in paths[:n]) + (f" (and {len(paths) - n} more)" if len(paths) > n else "")


def _read_split(split_dir: Path, classes: list[str]) -> Split:
    # Cheap checks first, so a stray file fails the run before any decoding.
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _visible(split_dir / name)
        if not files:
            raise UserError(f"{split_dir / name} holds no images: add PNG/JPEG files or remove the folder.")
        paths += files
        labels += [label] * len(files)
    strays = [p for p in paths if p.suffix.lower() not in IMAGE_SUFFIXES]
    if strays:
        raise UserError(
            f"{len(strays)} file(s) in {split_dir} are not PNG or JPEG images: {_examples(strays)}. "
            f"Move them out of the image folder."
        )
    # One thread: on 2 cores, threads made it slower (the GIL; each image is tiny). docs/data.md
    images = [_decode(p) for p in paths]
    broken = [p for p, img in zip(paths, images, strict=True) if img is None]
    if broken:
        raise UserError(
            f"{len(broken)} file(s) in {split_dir} are not readable images (corrupt or truncated): "
            f"{_examples(broken)}. Replace or remove them."
        )
    wrong = [
        f"{p} ({img.shape[2]}x{img.shape[1]})"
        for p, img in zip(paths, images, strict=True)
        if img.shape[1:] != (32, 32)
    ]
    if wrong:
        raise UserError(
            f"{len(wrong)} image(s) in {split_dir} are not 32x32: {_examples(wrong)}. Training data is "
            f"never resized silently: resize them to 32x32 first (prediction accepts any size)."
        )
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _decode(path: Path) -> torch.Tensor | None:
    """(3, H, W) uint8 RGB (grayscale, palette and RGBA converted), or None for a file no decoder reads."""
    try:  # torchvision's libjpeg-turbo/libpng: several times faster than PIL, the same pixels
        img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        if img.dtype == torch.uint8:
            return img
    except Exception:  # noqa: BLE001 - PIL decides: it reads a few formats torchvision does not
        pass
    try:
        with Image.open(path) as pil:
            rgb = np.asarray(pil.convert("RGB"))  # (H, W, 3) uint8
    except Exception:  # noqa: BLE001 - decoders raise many types; all mean a bad file
        return None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)
