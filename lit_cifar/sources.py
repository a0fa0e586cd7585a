"""CIFAR on disk, in every form a user holds it, decoded once into uint8 tensors and cached.

Looked for in `data_dir`, in this order:
  train/<class>/*.png|jpg (+ optional test/<class>/...)   an image folder (classes: sorted names)
  cifar-10-batches-py/ | cifar-100-python/                 extracted pickles, md5-verified
  cifar-10-python.tar.gz | cifar-100-python.tar.gz         the archive: verified, then extracted
  nothing: torchvision downloads the archive (when allowed)

`prepare` (once per machine) fetches, checks and decodes one split (train or test) into the cache;
`load` (every process) reads the cache. Each split is decoded and cached on its own, so testing never
decodes the training images. `decode` turns one image file into pixels, for training and prediction alike. Every write goes to a temporary name first and is renamed into place, so a killed
run leaves the old state, never a half file; its leftovers are swept up by the next run.

    python -c "from lit_cifar.sources import load; print(load('data', splits=('train',))['train'][0].shape)"
"""

import hashlib
import os
import pickle
import shutil
import socket
import tarfile
import tempfile
from pathlib import Path

import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_url

from lit_cifar.errors import UserError
from lit_cifar.images import (
    IMAGE_SUFFIXES,
    NOT_IMAGE,
    NOT_REGULAR,
    BadFile,
    _examples,
    decode,
    file_kind,
    refuse,
)

DATASETS = {"cifar10": CIFAR10, "cifar100": CIFAR100}  # torchvision holds the names and md5s
SPLITS = ("train", "test")
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


def _visible(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError as err:
        raise UserError(f"cannot list {path} ({err.strerror}): make it a readable folder.") from None


def _root(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser().resolve()


def is_image_folder(data_dir: str | Path) -> bool:
    """Holds train/ or test/ (of whatever kind: a file there is refused later, by name)."""
    return any(os.path.lexists(Path(data_dir).expanduser() / split) for split in SPLITS)


def has_test(data_dir: str | Path) -> bool:
    """Whether the data have a test split: CIFAR's pickles always do, an image folder when it holds test/."""
    return not is_image_folder(data_dir) or os.path.lexists(Path(data_dir).expanduser() / "test")


def folder_classes(data_dir: str | Path) -> list[str]:
    """An image folder's classes: train/'s class folders (test/'s when there is no train/); at least two."""
    root = Path(data_dir).expanduser()
    found = {split: _class_folders(root / split) for split in SPLITS if os.path.lexists(root / split)}
    if len(found) == 2 and found["train"] != found["test"]:
        train, test = set(found["train"]), set(found["test"])
        raise UserError(
            f"{root / 'train'} and {root / 'test'} have different class folders "
            f"(only in train: {sorted(train - test)}, only in test: {sorted(test - train)}): make them the same."
        )
    split, classes = next(iter(found.items()))
    if len(classes) < 2:
        raise UserError(
            f"{root / split} holds {len(classes)} class folder(s) {classes}: a classifier needs at least two. "
            f"Put each class's images in its own folder: {split}/<class>/*.png|jpg."
        )
    return classes


def _class_folders(split_dir: Path) -> list[str]:
    kind, _ = file_kind(split_dir)
    if kind != "a folder":
        raise UserError(
            f"{split_dir} is {kind}: make it a folder of class folders ({split_dir.name}/<class>/*.png)."
        )
    entries = _visible(split_dir)
    strays = [f"{p} ({file_kind(p)[0]})" for p in entries if file_kind(p)[0] != "a folder"]
    if strays:
        raise UserError(
            f"{split_dir} must hold only class folders, but holds {_examples(strays)}: "
            f"move images into a class folder ({split_dir.name}/<class>/x.png), anything else out."
        )
    return [p.name for p in entries]


def _misplaced_images(root: Path) -> None:
    """Refuse a folder of images laid out wrongly, which would otherwise be taken for "no data"."""
    if not root.is_dir():
        return
    if root.name in SPLITS and is_image_folder(root.parent):
        raise UserError(
            f"{root} is the {root.name}/ folder of an image folder: point data_dir at {root.parent}."
        )
    for sub in _visible(root):
        if (sub / "train").is_dir() or (sub / "test").is_dir():
            raise UserError(
                f"{root} holds no data itself, but {sub} holds an image folder: point data_dir at {sub}."
            )
        if sub.is_dir() and any(e.name.lower().endswith(IMAGE_SUFFIXES) for e in os.scandir(sub)):
            raise UserError(
                f"{root} holds folders of images ({sub.name}/) but no train/ or test/ folder: move the class "
                f"folders into {root / 'train'} (train/<class>/*.png|jpg, optional test/<class>/)."
            )


# ---------------------------------------------------------------------------- one file


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
    data_dir: str,
    dataset: str = "cifar10",
    download: bool = True,
    checksums: dict[str, str] | None = None,
    split: str = "train",
) -> int:
    """Fetch what is missing (extract a placed archive, or download one), check it, fill the cache
    of `split` (train or test).

    Every problem with the data surfaces here, before a run writes anything else.
    Returns the number of images in `split`.
    """
    root = _root(data_dir)
    tv = DATASETS[dataset]
    sums = expected_md5s(dataset, checksums)
    if root.exists() and not root.is_dir():
        raise UserError(f"data_dir {root} is a file: point data_dir at the folder that holds the data.")
    if not is_image_folder(root) and not (root / tv.base_folder).is_dir():
        archive = root / tv.filename
        if not archive.exists():
            _misplaced_images(root)
            if not download:
                where = "does not exist" if not root.exists() else f"holds no {dataset} data"
                raise UserError(
                    f"data_dir {root} {where} and download is off (--data.download false).\n"
                    + _supply_by_hand(root, dataset)
                )
            _download(root, dataset, sums)
        _extract(archive, sums)
    key, read = _source(root, dataset, sums, split)
    _JUST_PREPARED[_handoff(root, dataset, sums, split)] = key
    return len(_cached(root, key, read)["y"])


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


def load(
    data_dir: str,
    dataset: str = "cifar10",
    checksums: dict[str, str] | None = None,
    splits: tuple[str, ...] = SPLITS,
) -> dict:
    """{split: (x, y) (None for a test split the data lack), "classes": [...]}, from the cache when current."""
    root = _root(data_dir)
    sums = expected_md5s(dataset, checksums)
    out = {}
    for split in splits:
        if split == "test" and not has_test(root):
            out["test"] = None
            continue
        # Lightning calls setup right after prepare_data: take the key prepare() just checked in this
        # process instead of reading every file's size and time again (0.4 s for 50,000 images). Once only.
        known = _JUST_PREPARED.pop(_handoff(root, dataset, sums, split), None)
        data = _cached(root, *_source(root, dataset, sums, split, known))
        out[split], out["classes"] = (data["x"], data["y"]), data["classes"]
    return out


_JUST_PREPARED: dict[tuple, str] = {}


def _handoff(root: Path, dataset: str, checksums: dict[str, str], split: str) -> tuple:
    return root, dataset, tuple(sorted(checksums.items())), split


def _source(
    root: Path, dataset: str, checksums: dict[str, str], split: str, key: str | None = None
) -> tuple[str, object]:
    """(cache key, function that reads `split` from the source) for what `root` holds."""
    if is_image_folder(root):
        if key:  # checked in this process by prepare(): list the files again only if the cache is gone
            return key, lambda: _read_folder(*_list_folder(root, split))
        listing = _list_folder(root, split)
        return _folder_key(root, split, listing), lambda: _read_folder(*listing)
    return key or _batches_key(root, dataset, checksums, split), lambda: _read_batches(root, dataset, split)


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
    try:
        if not path.exists():  # PermissionError when its folder is closed to us: no cache either
            return None
        # mmap: pages are read when used, so a cache hit costs almost nothing until the split copies.
        data = torch.load(path, weights_only=True, mmap=True)
        x, y, classes = data["x"], data["y"], data["classes"]
        ok = x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and y.shape == (len(x),)
        return data if ok and all(isinstance(name, str) for name in classes) else None
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


def _folder_key(root: Path, split: str, listing: tuple) -> str:
    """folder-<where>-<split>-<what>: any file added, removed, renamed or rewritten changes <what>."""
    split_dir, classes, paths, _, stats = listing
    h = hashlib.sha1(f"{CACHE_VERSION}\0{classes}".encode())
    for path, st in zip(paths, stats, strict=True):
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    where = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return f"folder-{where}-{split}-{h.hexdigest()[:16]}"


def _batch_names(dataset: str, split: str) -> list[str]:
    tv = DATASETS[dataset]
    return [name for name, _ in (tv.train_list if split == "train" else tv.test_list)]


def _batches_key(root: Path, dataset: str, checksums: dict[str, str], split: str) -> str:
    # Verifying every file is the key: the md5s themselves name the content.
    tv = DATASETS[dataset]
    folder = root / tv.base_folder
    if not folder.is_dir():
        raise UserError(f"no {dataset} data in {root}.\n" + _supply_by_hand(root, dataset))
    names = [*_batch_names(dataset, split), tv.meta["filename"]]
    # Every file is verified, whichever split is read: a damaged test_batch stops `fit` before it starts.
    for name in [*_batch_names(dataset, "train"), *_batch_names(dataset, "test"), tv.meta["filename"]]:
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
    return f"{dataset}-{split}-" + digest.hexdigest()[:20]


def _read_batches(root: Path, dataset: str, split: str) -> dict:
    tv = DATASETS[dataset]
    folder = root / tv.base_folder
    xs, ys = [], []
    for name in _batch_names(dataset, split):
        with open(folder / name, "rb") as f:  # safe: the file passed its md5 check above
            entry = pickle.load(f, encoding="latin1")
        xs.append(torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        ys.append(torch.as_tensor(entry.get("labels", entry.get("fine_labels")), dtype=torch.int64))
    with open(folder / tv.meta["filename"], "rb") as f:
        classes = list(pickle.load(f, encoding="latin1")[tv.meta["key"]])
    return {"x": torch.cat(xs), "y": torch.cat(ys), "classes": classes}


def _list_folder(root: Path, split: str) -> tuple:
    """(split folder, classes, image paths, labels, their stats), every file checked before any decoding:
    regular files (never a named pipe, which would block), PNG/JPEG by name, no empty class folder."""
    split_dir = root / split
    classes = folder_classes(root)
    if not os.path.lexists(split_dir):
        raise UserError(
            f"{root} has no {split}/ folder: add {split}/<class>/*.png|jpg images, "
            + (
                "or run `validate` (on train/) instead."
                if split == "test"
                else "or, with only test/, run `lit-cifar test`: fitting and validating read train/."
            )
        )
    paths, labels, stats, problems = [], [], [], []
    for label, name in enumerate(classes):
        files = _visible(split_dir / name)
        if not files:
            raise UserError(f"{split_dir / name} holds no images: add PNG/JPEG files or remove the folder.")
        for path in files:
            kind, st = file_kind(path)
            if kind != "a file":
                nested = "; class folders hold images, not folders" if kind == "a folder" else ""
                problems.append((path, BadFile(NOT_REGULAR, kind + nested)))
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                problems.append((path, BadFile(NOT_IMAGE)))
            paths.append(path)
            labels.append(label)
            stats.append(st)
    refuse(split_dir, problems)
    return split_dir, classes, paths, labels, stats


def _read_folder(split_dir: Path, classes: list[str], paths: list[Path], labels: list[int], stats) -> dict:
    # One thread: on 2 cores, threads made it slower (the GIL; each image is tiny). docs/data.md
    images, problems = [], []
    for path in paths:
        try:
            images.append(decode(path, size=(32, 32)))
        except BadFile as err:
            problems.append((path, err))
    refuse(split_dir, problems)
    return {"x": torch.stack(images), "y": torch.tensor(labels, dtype=torch.int64), "classes": classes}
