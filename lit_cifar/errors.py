"""Bad input a user can fix, and the one error boundary every entry point's `main()` runs in
(`with boundary(): ...`): an expected failure (a UserError, an OSError, a setting Lightning, torch or a
parser rejected, SIGINT, SIGTERM) ends as one line `error: <what, where>: <fix>` and a non-zero exit,
after undoing what the failed run created (`on_failure`); a bug keeps its traceback
(LIT_CIFAR_TRACEBACK=1: every failure does). No torch or Lightning import here: `--help` stays fast.
"""

import argparse
import errno
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TRACEBACK_ENV = "LIT_CIFAR_TRACEBACK"
INTERRUPTED_EXIT = 130  # the shell's status for a process ended by Ctrl-C


class UserError(ValueError):
    """A bad input (path, file, setting). The message names the problem and the fix."""


def check_number(
    name: str, value, low: float | None = None, high: float | None = None, *, open_low=False, open_high=False
) -> None:
    """UserError unless `value` is a finite number in [low, high] (an end is excluded when open_*)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}: give one (see --help).")
    if (low is not None and (value <= low if open_low else value < low)) or (
        high is not None and (value >= high if open_high else value > high)
    ):
        lo = "" if low is None else f"above {low:g}" if open_low else f"at least {low:g}"
        hi = "" if high is None else f"below {high:g}" if open_high else f"at most {high:g}"
        lo = {"above 0": "positive", "at least 0": "0 or more"}.get(lo, lo)
        raise UserError(f"{name} must be {' and '.join(s for s in (lo, hi) if s)}, got {value!r}.")


def one_line(text: object) -> str:
    """A message squeezed onto one line (parsers and libraries write several)."""
    return re.sub(r"\s+", " ", str(text)).strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts: a bad flag is one line and a pointer to --help, not the usage."""

    def __init__(self, *args, **kwargs) -> None:
        if sys.argv[0].endswith(".py"):  # the pointer names the command as typed: `python scripts/x.py`
            kwargs.setdefault("prog", f"python {os.path.relpath(sys.argv[0])}")
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        sys.exit(f"error: {message}: see `{self.prog} --help`.")


_undo: list[Callable[[], None]] = []


def on_failure(undo: Callable[[], None]) -> None:
    """Have the boundary call `undo` if the run fails (e.g. remove the empty run folder it created)."""
    _undo.append(undo)


@contextmanager
def boundary(rewrite: Callable[[str], str] = str) -> Iterator[None]:
    """Expected failures -> `error: ...` on stderr and a non-zero exit; bugs keep their traceback.
    `rewrite` adapts the message to the command (scripts/train.py names its own flags)."""
    try:
        yield
    except BaseException as err:
        signal_name = _interrupted(err)
        if isinstance(err, SystemExit) and not signal_name and not isinstance(err.code, str):
            raise  # --help, a finished run, a deliberate status (some files skipped)
        for undo in reversed(_undo):
            undo()
        message = describe(err)  # None for a bug, and for sys.exit("error: ..."): already the line
        if message is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        if signal_name == "SIGINT":
            print(f"error: {rewrite(message)}", file=sys.stderr)
            raise SystemExit(INTERRUPTED_EXIT) from None
        raise SystemExit(f"error: {rewrite(message)}") from None  # Python prints it to stderr, exits with 1
    finally:
        _undo.clear()


def _interrupted(err: BaseException) -> str | None:
    """SIGINT/SIGTERM, also as the SystemExit Lightning ends an interrupted run with."""
    if isinstance(err, KeyboardInterrupt) or isinstance(err.__context__, KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after one
        return "SIGINT"
    return "SIGTERM" if type(err).__name__ == "SIGTERMException" else None  # Lightning's, a SystemExit(0)


def describe(err: BaseException) -> str | None:
    """The one line for an expected failure; None for a bug (then the traceback is shown)."""
    if signal_name := _interrupted(err):
        return (
            f"stopped by {signal_name} before the run finished. Continue it with the same command plus "
            f"--ckpt_path last: the steps since its last checkpoint (at most "
            f"--last_checkpoint.every_n_train_steps) are trained again."
        )
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):
        what = err.strerror or one_line(err) or type(err).__name__
        where = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
        fix = _OS_FIXES.get(err.errno, "check the path and its permissions")
        return f"{what}{': ' + where if where else ''}: {fix}."
    if type(err).__name__ in ("MisconfigurationException", "ArgumentError"):  # Lightning, the parsers
        return f"{one_line(err)}: see --help."
    if isinstance(err, MemoryError):
        return "out of memory: use a smaller --data.batch_size, or a machine with more memory."
    return None


_OS_FIXES = {
    errno.ENOENT: "check the path (it, or a folder on it, does not exist)",
    errno.EACCES: "choose a place you may read and write (e.g. --trainer.default_root_dir), or change its permissions",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.ENOSPC: "the disk is full: free some space, or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space, or write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EISDIR: "it is a folder: give a file",
    errno.ELOOP: "a symbolic link on the path points back to itself: fix or remove the link",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EEXIST: "it exists already: remove it or choose another name",
    errno.ENOTEMPTY: "the folder is not empty: choose another one",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer --data.num_workers",
}
_OS_FIXES[errno.EPERM] = _OS_FIXES[errno.EACCES]


def check_writable(folder: str | Path, setting: str) -> None:
    """UserError unless `folder` is, or can be made, a folder this process may write in."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if existing.is_symlink() and not existing.exists():
        raise UserError(f"{existing} is a broken symbolic link: fix it, or choose another {setting}.")
    if not existing.is_dir():
        raise UserError(f"{existing} is a file, not a folder: choose another {setting}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"{existing} is read-only for this user: choose a folder you may write with {setting}."
        )


def check_output(path: str | Path, written_by_us: Callable[[Path], bool], setting: str) -> None:
    """UserError unless `path` can be written: not a folder, its folder writable, and an existing file
    only when this command wrote it (a re-run replaces its own output, never a user's other file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{path} is a folder, not a file: give {setting} a file path (e.g. a new file in {path})."
        )
    if path.exists() and not written_by_us(path):
        raise UserError(
            f"{path} exists and was not written by this command: it is never overwritten. Give "
            f"{setting} another name, or remove the file yourself."
        )
    check_writable(path.parent, setting)


def check_accelerator(accelerator: str | None, setting: str) -> None:
    """UserError when a GPU is asked for and there is none (Lightning's own message names no fix)."""
    import torch  # here, not at the top: errors.py imports no torch (fast --help)

    usable = torch.cuda.is_available() or (accelerator == "gpu" and torch.backends.mps.is_available())
    if accelerator in ("gpu", "cuda") and not usable:
        raise UserError(
            f"accelerator {accelerator!r} asked for, but this machine has no usable GPU (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}): use {setting} cpu (or auto: a "
            f"GPU when there is one)."
        )
