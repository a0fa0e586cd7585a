"""One image file -> uint8 RGB pixels, checked from its header first; the same pixels for training and prediction.

`decode` (training: 32x32 only) and `read_image` (prediction: any size, resized) both go through
`open_image` (the checks) and `pixels` (the decoding). A file that cannot be used raises BadFile; `refuse`
turns a folder's BadFiles into one error line. docs/data.md, "Reading an image", says what is accepted.

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
KINDS = {
    stat.S_IFREG: "a file",
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
}
KINDS |= {stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}
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
# Decoded by torchvision (libjpeg-turbo/libpng, faster than PIL: docs/data.md) at 32x32, all that training
# reads; every other file by PIL. Both give the same pixels (tests/test_data.py).
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
