"""TODO docstring: lit_cifar/images.py."""

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
    kinds = [(stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe")]
    kinds += [(stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")]
    return next((name for test, name in kinds if test(st.st_mode)), "not a regular file"), st


class BadFile(ValueError):
    """One file that is no usable image. Files are grouped by `what`; `detail` is this file's."""

    def __init__(self, kind: tuple[str, str], detail: str = "") -> None:
        super().__init__(f"{detail}: {kind[1]}" if detail else kind[1])  # as one file's reason
        (self.what, self.fix), self.detail = kind, detail


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
    f"Images over {Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's guard against decompression bombs) are "
    f"refused: shrink them first.",
)


BAD_MODE = (
    "have a pixel format lit-cifar does not convert",
    "Save them as 8- or 16-bit RGB or grayscale PNG/JPEG.",
)


# PIL modes turned into 8-bit RGB: by PIL's convert, or (16-bit gray) scaled to 8 bits here.
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", *SIXTEEN_BIT)


# Decoded by torchvision (libjpeg-turbo/libpng, about 2x faster than PIL: docs/data.md) at 32x32 (all
# that training reads); every other file by PIL. Both give the same pixels (tests/test_data.py).
FAST = {("JPEG", m) for m in ("L", "RGB")} | {("PNG", m) for m in ("L", "LA", "P", "RGB", "RGBA")}


def open_image(path: str | Path, size: tuple[int, int] | None = None) -> Image.Image:
    """The image, its header read but nothing decoded yet (PIL is lazy), checked: a regular file,
    `size` (the size it must have) or, when None, at most Image.MAX_IMAGE_PIXELS pixels, a known mode.
    Raises BadFile."""
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
    w, h = img.size
    problem = None
    if size is not None and img.size != size:
        problem = BadFile(WRONG_SIZE, f"{w}x{h}")
    elif img.mode not in MODES:
        problem = BadFile(BAD_MODE, f"mode {img.mode}")
    if problem:
        img.close()
        raise problem
    return img


def decode(path: str | Path, size: tuple[int, int] | None = (32, 32)) -> torch.Tensor:
    """An image file -> uint8 (3, H, W) RGB, upright (EXIF). Checked before decoding (`open_image`)."""
    with open_image(path, size) as img:
        return pixels(img)


def pixels(img: Image.Image) -> torch.Tensor:
    """An image from `open_image` -> uint8 (3, H, W) RGB: upright (EXIF), alpha dropped, 16 bits scaled
    to 8 (the high byte, as libpng and PIL do for 16-bit RGB). Raises BadFile for a broken file."""
    try:
        if img.size == (32, 32) and (img.format, img.mode) in FAST:
            x = _torchvision_decode(img.filename)
            if x is not None:
                return x
        img = ImageOps.exif_transpose(img)  # decodes
        if img.mode in SIXTEEN_BIT:
            gray = np.asarray(img).astype(np.int64)  # (H, W)
            if gray.min() < 0 or gray.max() > 65535:
                raise BadFile(BAD_MODE, "mode I with values outside 0-65535")
            rgb = np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2)
        else:
            rgb = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
    except BadFile:
        raise
    except Exception as err:  # noqa: BLE001 - decoders raise many types; all mean a broken file
        raise BadFile(CORRUPT, str(err).splitlines()[0][:100] or type(err).__name__) from None
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
    others = len(problems) - len(same)
    more = f" ({others} other file(s) have other problems.)" if others else ""
    raise UserError(f"{len(same)} file(s) in {where} {what}: {_examples(same)}. {fix}{more}")


def _examples(paths: list, n: int = 3) -> str:
    return ", ".join(str(p) for p in paths[:n]) + (f" (and {len(paths) - n} more)" if len(paths) > n else "")


def find_images(inputs: str | Sequence[str]) -> list[Path]:
    """Files named directly (whatever their suffix) and PNG/JPEG files found under folders, in order.

    Only regular files: a named pipe, socket, device or broken link is refused before anything is read."""
    paths: list[Path] = []
    for item in [inputs] if isinstance(inputs, str) else inputs:
        path = Path(item)
        if not os.path.lexists(path):
            raise UserError(f"{path} does not exist: give image files or folders of images.")
        if path.is_dir():
            paths += sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and not p.is_dir()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            paths.append(path)
    refuse(
        ", ".join(map(str, [inputs] if isinstance(inputs, str) else inputs)),
        [(p, BadFile(NOT_REGULAR, kind)) for p in paths if (kind := file_kind(p)[0]) != "a file"],
    )
    if not paths:
        raise UserError(f"no PNG/JPEG images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}.")
    return paths


def read_image(path: str | Path) -> torch.Tensor:
    """Any image PIL reads -> uint8 (3, 32, 32): upright (EXIF), RGB, resized with antialiasing.

    A 32x32 file gives exactly the pixels training reads from it (`pixels`); files over
    Image.MAX_IMAGE_PIXELS are refused before decoding. Raises BadFile."""
    with open_image(path) as img:
        if img.size != (32, 32):
            img.draft("RGB", (64, 64))  # JPEG: decode big photos at a reduced scale (>= 64 px), much faster
        x = pixels(img)  # (3, H, W)
    if x.shape[1:] != (32, 32):
        # Squashed to 32x32 like CIFAR's source images; bicubic antialiases when shrinking.
        small = Image.fromarray(x.permute(1, 2, 0).numpy()).resize((32, 32), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(small)).permute(2, 0, 1)  # (32, 32, 3) -> (3, 32, 32)
    return x
