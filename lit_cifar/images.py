"""Image files and image folders: checked (from the header, before decoding), then decoded to uint8 RGB.

`decode` (training: 32x32 only) and `read_image` (prediction: any size, resized) both go through
`open_image` (the checks) and `pixels` (the decoding), so a file gives the same pixels in both.
`list_folder` checks an image folder (train/<class>/*.png|jpg) file by file before anything is decoded.
A file that cannot be used raises BadFile; `refuse` turns a folder's BadFiles into one error line.
docs/data.md, "Reading an image" and "Bad input", says what is accepted and what each refusal reads.

    python -c "from lit_cifar.images import read_image; print(read_image('cat.png').shape)"
"""

import errno
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, read_file

from lit_cifar.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")  # an image folder's: train/<class>/*.png|jpg, test/<class>/...
KINDS = {stat.S_IFREG: "a file", stat.S_IFDIR: "a folder", stat.S_IFIFO: "a named pipe"}
KINDS |= {stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}
# What is wrong with a group of files, and the fix: (what, fix).
NOT_REGULAR = ("are not regular files", "Replace each with a regular PNG/JPEG file, or move it out.")
NOT_IMAGE = ("are not PNG or JPEG images", "Move them out of the image folder.")
UNREADABLE = ("could not be read", "Make them readable (chmod a+r), or move them out.")
CORRUPT = ("are not readable images (corrupt or truncated)", "Replace or remove them.")
WRONG_SIZE = (
    "are not 32x32",
    "Training data is never resized silently: resize them to 32x32 first (prediction accepts any size).",
)
TOO_BIG = (
    "are too big to decode safely",
    f"Images over {Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's guard against decompression bombs) are refused: shrink them first.",
)
BAD_MODE = (
    "have a pixel format lit-cifar does not convert",
    "Save them as 8- or 16-bit RGB or grayscale PNG/JPEG.",
)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # grayscale, scaled to 8 bits here; the rest by PIL
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", *SIXTEEN_BIT)
# Decoded by torchvision (libjpeg-turbo/libpng) at 32x32, all that training reads;
# every other file by PIL. Both give the same pixels (tests/test_data.py).
FAST = {("JPEG", "L"), ("JPEG", "RGB")} | {("PNG", m) for m in ("L", "LA", "P", "RGB", "RGBA")}


class BadFile(ValueError):
    """One file that is no usable image. Files are grouped by `what`; `detail` is this file's."""

    def __init__(self, kind: tuple[str, str], detail: str = "") -> None:
        super().__init__(f"{detail}: {kind[1]}" if detail else kind[1])  # as one file's reason
        (self.what, self.fix), self.detail = kind, detail


def file_kind(path: Path) -> tuple[str, os.stat_result | None]:
    """(what is at `path` in words: "a file" for a regular file, "a named pipe", ...; its stat)."""
    try:
        st = os.stat(path)  # follows links; never opens the file (a named pipe would block)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop", None
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)})", None
        return f"unreadable ({err.strerror})", None
    return KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file"), st


def open_image(path: str | Path, size: tuple[int, int] | None = None) -> Image.Image:
    """The image with only its header read (PIL is lazy), checked: a regular file, of `size` (None: at most
    Image.MAX_IMAGE_PIXELS pixels), in a mode of MODES. Raises BadFile."""
    kind, st = file_kind(Path(path))
    if kind != "a file":
        raise BadFile(NOT_REGULAR, kind)
    if st.st_size == 0:
        raise BadFile(CORRUPT, "empty: 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadFile(WRONG_SIZE if size else TOO_BIG, f"over {Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except UnidentifiedImageError:
        raise BadFile(CORRUPT, "not an image format Pillow knows") from None
    except OSError as err:
        raise BadFile(UNREADABLE, err.strerror or str(err)) from None
    if size is not None and img.size != size:
        img.close()
        raise BadFile(WRONG_SIZE, "{}x{}".format(*img.size))
    if img.mode not in MODES:
        img.close()
        raise BadFile(BAD_MODE, f"mode {img.mode}")
    return img


def decode(path: str | Path, size: tuple[int, int] | None = (32, 32)) -> torch.Tensor:
    """An image file -> uint8 (3, H, W) RGB, upright (EXIF). Checked before decoding (`open_image`)."""
    with open_image(path, size) as img:
        return pixels(img)


def pixels(img: Image.Image) -> torch.Tensor:
    """An image from `open_image` -> uint8 (3, H, W) RGB: upright (EXIF), alpha dropped, 16 bits scaled
    to 8 (the high byte, as libpng and PIL do for 16-bit RGB). Raises BadFile for a broken file."""
    if img.size == (32, 32) and (img.format, img.mode) in FAST:
        x = _torchvision_decode(img.filename)
        if x is not None:
            return x
    try:
        img = ImageOps.exif_transpose(img)  # decodes
        gray = np.asarray(img).astype(np.int64) if img.mode in SIXTEEN_BIT else None  # (H, W)
        rgb = np.asarray(img.convert("RGB")) if gray is None else None  # (H, W, 3) uint8
    except Exception as err:  # noqa: BLE001 - decoders raise many types; all mean a broken file
        raise BadFile(CORRUPT, (str(err).splitlines() or [type(err).__name__])[0][:100]) from None
    if gray is not None:
        if gray.min() < 0 or gray.max() > 65535:
            raise BadFile(BAD_MODE, "mode I with values outside 0-65535")
        rgb = np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _torchvision_decode(path: str) -> torch.Tensor | None:
    try:
        x = decode_image(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:  # a broken file: PIL decodes it next and says what is wrong
        return None
    return x if x.dtype == torch.uint8 else None  # 16-bit PNGs come back as uint16: PIL scales those


def refuse(where: Path | str, problems: list[tuple[Path, BadFile]]) -> None:
    """One line for the first kind of problem found: how many files, which (the first three), the fix."""
    if not problems:
        return
    what, fix = problems[0][1].what, problems[0][1].fix
    same = [f"{p} ({e.detail})" if e.detail else str(p) for p, e in problems if e.what == what]
    more = (
        f" ({len(problems) - len(same)} other file(s) have other problems.)"
        if len(same) < len(problems)
        else ""
    )
    raise UserError(f"{len(same)} file(s) in {where} {what}: {examples(same)}. {fix}{more}")


def examples(items: list, n: int = 3) -> str:
    """The first n, then how many more."""
    return ", ".join(map(str, items[:n])) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def find_images(inputs: str | Sequence[str]) -> list[Path]:
    """Files named directly (whatever their suffix) and PNG/JPEG files found under folders (not hidden ones),
    in order. Only regular files: a named pipe, socket, device or broken link is refused before anything is read."""
    inputs = [inputs] if isinstance(inputs, str) else [str(i) for i in inputs]
    paths: list[Path] = []
    for path in map(Path, inputs):
        if not os.path.lexists(path):
            raise UserError(f"{path} does not exist: give image files or folders of images.")
        if not path.is_dir():
            paths.append(path)
            continue
        found = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]
        paths += sorted(p for p in found if not any(s.startswith(".") for s in p.relative_to(path).parts))
    refuse(
        ", ".join(inputs), [(p, BadFile(NOT_REGULAR, k)) for p in paths if (k := file_kind(p)[0]) != "a file"]
    )
    if not paths:
        raise UserError(f"no PNG/JPEG images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(inputs)}.")
    return paths


def read_image(path: str | Path) -> torch.Tensor:
    """Any image PIL reads -> uint8 (3, 32, 32): `pixels`, then squashed to 32x32 like CIFAR's sources
    (bicubic, antialiased). A 32x32 file gives exactly the pixels training reads. Raises BadFile."""
    with open_image(path) as img:
        if img.size != (32, 32):
            img.draft("RGB", (64, 64))  # JPEG: decode big photos at a reduced scale (>= 64 px), much faster
        x = pixels(img)  # (3, H, W)
    if x.shape[1:] != (32, 32):
        small = Image.fromarray(x.permute(1, 2, 0).numpy()).resize((32, 32), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(small)).permute(2, 0, 1)  # (32, 32, 3) -> (3, 32, 32)
    return x


def is_image_folder(data_dir: str | Path) -> bool:
    """Holds train/ or test/ (of whatever kind: a file there is refused later, by name)."""
    return any(os.path.lexists(Path(data_dir).expanduser() / split) for split in SPLITS)


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
    if (kind := file_kind(split_dir)[0]) != "a folder":
        raise UserError(
            f"{split_dir} is {kind}: make it a folder of class folders ({split_dir.name}/<class>/*.png)."
        )
    entries = _visible(split_dir)
    if strays := [f"{p} ({k})" for p in entries if (k := file_kind(p)[0]) != "a folder"]:
        raise UserError(
            f"{split_dir} must hold only class folders, but holds {examples(strays)}: "
            f"move images into a class folder ({split_dir.name}/<class>/x.png), anything else out."
        )
    return [p.name for p in entries]


def _visible(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError as err:
        raise UserError(f"cannot list {path} ({err.strerror}): make it a readable folder.") from None


def list_folder(root: Path, split: str) -> tuple:
    """(split folder, classes, image paths, labels, their stats), every file checked before any decoding:
    regular files (never a named pipe, which would block), PNG/JPEG by name, no empty class folder."""
    split_dir, classes = root / split, folder_classes(root)
    if not os.path.lexists(split_dir):
        fix = "or, with only test/, run `lit-cifar test`: fitting and validating read train/."
        fix = "or run `validate` (on train/) instead." if split == "test" else fix
        raise UserError(f"{root} has no {split}/ folder: add {split}/<class>/*.png|jpg images, {fix}")
    found, problems = [], []
    for label, name in enumerate(classes):
        if not (files := _visible(split_dir / name)):
            raise UserError(f"{split_dir / name} holds no images: add PNG/JPEG files or remove the folder.")
        for path in files:
            kind, st = file_kind(path)
            if kind != "a file":
                nested = "; class folders hold images, not folders" if kind == "a folder" else ""
                problems.append((path, BadFile(NOT_REGULAR, kind + nested)))
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                problems.append((path, BadFile(NOT_IMAGE)))
            found.append((path, label, st))
    refuse(split_dir, problems)
    return split_dir, classes, *zip(*found, strict=True)


def misplaced_images(root: Path) -> None:
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
