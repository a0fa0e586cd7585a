"""The commands as users run them, timed end to end.

    python scripts/speed_e2e.py compare --data-dir ../shared/cifar10-jpeg      # ~7 min on a 2-core CPU
    python scripts/speed_e2e.py until 0.665 -- --config configs/seed_bn.yaml --data.data_dir DIR

compare: each command in its own process, alternating, round after round: the seed's loop
(`scripts/benchmark.py --only a`), `lit-cifar fit` with the default recipe, and `lit-cifar fit
--config configs/seed.yaml`. Each runs for --steps SHORT and LONG training steps (both inside the
first epoch, so only the sanity check validates); img/s = (LONG - SHORT) x batch images / the
difference of the two wall times, so start-up (imports, data loading, model summary) cancels.
Ratios against the seed's loop are the median over rounds of each round's ratio. One untimed run
of each command comes first, so the first round does not pay for a cold file cache.

until: one `lit-cifar fit` run (any fit arguments after `--`), built by the CLI's own classes,
with a callback timing each training epoch (validation excluded, device synced at both ends):
prints each epoch's val/acc and the seconds of training until val/acc first reached TARGET.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from lit_cifar.cli import LitCifarCLI
from lit_cifar.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    modes = parser.add_subparsers(dest="mode", required=True)
    compare = modes.add_parser("compare", help="the seed's loop against lit-cifar fit, in processes")
    compare.add_argument("--data-dir", required=True)
    compare.add_argument("--rounds", type=int, default=3)
    compare.add_argument("--steps", type=int, nargs=2, default=[50, 400], metavar=("SHORT", "LONG"))
    compare.add_argument("--out", help="also write the wall times and results as JSON to this file")
    until = modes.add_parser("until", help="one fit run: seconds of training until val/acc >= TARGET")
    until.add_argument("target", type=float, help="val/acc to reach, e.g. 0.665")
    until.add_argument("--out", help="also write the per-epoch times and accuracies as JSON to this file")
    until.epilog = "After `--`: the `lit-cifar fit` arguments of the run (without `fit`)."
    return parser


# ---------------------------------------------------------------------------- compare


def commands(data_dir: str) -> dict[str, list[str]]:
    """What users type, with this interpreter (`python -m lit_cifar.cli` is the `lit-cifar` script)."""
    fit = [sys.executable, "-m", "lit_cifar.cli", "fit", "--data.data_dir", data_dir]
    return {
        "seed loop (benchmark.py --only a)": [
            sys.executable, str(ROOT / "scripts/benchmark.py"), "--data-dir", data_dir, "--only", "a",
        ],
        "lit-cifar fit (default recipe)": fit,
        "lit-cifar fit --config configs/seed.yaml": [*fit, "--config", str(ROOT / "configs/seed.yaml")],
    }  # fmt: skip


def steps_arg(cmd: list[str], n: int) -> list[str]:
    return [*cmd, "--steps", str(n)] if "--only" in cmd else [*cmd, "--trainer.max_steps", str(n)]


def compare(args: argparse.Namespace) -> dict:
    data_dir = str(Path(args.data_dir).resolve())  # the commands run in a temporary folder
    cmds = commands(data_dir)
    short, long = args.steps
    walls = {name: {short: [], long: []} for name in cmds}
    cpus = {name: {short: [], long: []} for name in cmds}  # CPU seconds (user + system) of each run
    with tempfile.TemporaryDirectory() as cwd:  # lit-cifar's logs and checkpoints land here
        for cmd in cmds.values():  # untimed: files into the page cache, modules compiled
            subprocess.run(steps_arg(cmd, 1), cwd=cwd, capture_output=True)
        for r in range(args.rounds):
            for n in (short, long):
                for name, cmd in cmds.items():
                    start, cpu = time.perf_counter(), children_cpu_s()
                    proc = subprocess.run(steps_arg(cmd, n), cwd=cwd, capture_output=True, text=True)
                    walls[name][n].append(time.perf_counter() - start)
                    cpus[name][n].append(children_cpu_s() - cpu)
                    if proc.returncode:
                        sys.exit(f"error: {' '.join(steps_arg(cmd, n))} failed:\n{proc.stderr[-3000:]}")
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{name.split(' (')[0]} {w[short][-1]:.1f}/{w[long][-1]:.1f} s" for name, w in walls.items()
            ), flush=True)  # fmt: skip
    images = (long - short) * 64  # batch 64 in all three
    speeds = {
        name: [images / (w[long][r] - w[short][r]) for r in range(args.rounds)] for name, w in walls.items()
    }
    seed = speeds[next(iter(cmds))]
    print(
        f"\nend to end, each command its own process | {args.data_dir} | batch 64 | {short} and {long} steps, "
        f"{args.rounds} rounds | {torch.get_num_threads()} threads, {cpu_name()}"
    )
    print(
        f"{'command':<44}{'img/s median':>13}{'min':>7}{'max':>7}{'start-up s':>12}{'x seed loop':>13}"
        f"{'CPU ms/step':>13}"
    )
    result = {"walls": walls, "cpu_s": cpus, "speeds": speeds, "ratios": {}}
    for name, s in speeds.items():
        ratio = statistics.median(c / a for c, a in zip(s, seed, strict=True))
        startup = statistics.median(w - short * 64 / v for w, v in zip(walls[name][short], s, strict=True))
        cpu_ms = statistics.median(
            1000 * (b - a) / (long - short) for a, b in zip(cpus[name][short], cpus[name][long], strict=True)
        )
        result["ratios"][name] = ratio
        print(
            f"{name:<44}{statistics.median(s):>13.0f}{min(s):>7.0f}{max(s):>7.0f}{startup:>12.1f}{ratio:>13.2f}"
            f"{cpu_ms:>13.1f}"
        )
    print(
        f"(img/s = {images} images / wall-time difference; ratio: median of the rounds' ratios; CPU ms/step: "
        "user + system time of the process per extra step, all its threads)"
    )
    return result


def children_cpu_s() -> float:
    t = os.times()  # includes every finished child process
    return t.children_user + t.children_system


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "cpu"


# ---------------------------------------------------------------------------- until


class EpochTimes(Callback):
    """Seconds of each training epoch (validation excluded, device synced) and val/acc after it."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.train_s: list[float] = []
        self.val_acc: list[float] = []

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = self._now(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # runs after validation
        self._stop(pl_module)

    def _stop(self, pl_module) -> None:
        if self.start is not None:
            self.train_s.append(self._now(pl_module) - self.start)
            self.start = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_acc.append(float(trainer.callback_metrics["val/acc"]))


def until(args: argparse.Namespace) -> dict:
    fit_args = args.fit_args
    cli = LitCifarCLI(args=fit_args, run=False)
    epochs = EpochTimes()
    cli.trainer.callbacks.append(epochs)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - start
    print(
        f"\nlit-cifar fit {' '.join(fit_args)}\n{'epoch':>5}{'train s':>9}{'total train s':>15}{'val/acc':>9}"
    )
    total, reached = 0.0, None
    for epoch, (seconds, acc) in enumerate(zip(epochs.train_s, epochs.val_acc, strict=False), 1):
        total += seconds
        if reached is None and acc >= args.target:
            reached = {"epoch": epoch, "train_s": total, "val_acc": acc}
        print(f"{epoch:>5}{seconds:>9.2f}{total:>15.2f}{acc:>9.4f}")
    print(
        f"fit {fit_s:.1f} s; val/acc first >= {args.target}: "
        + (f"epoch {reached['epoch']}, after {reached['train_s']:.2f} s of training" if reached else "never")
    )
    return {
        "fit_s": fit_s,
        "epoch_train_s": epochs.train_s,
        "epoch_val_acc": epochs.val_acc,
        "reached": reached,
    }


def main(args: argparse.Namespace) -> None:
    try:
        result = compare(args) if args.mode == "compare" else until(args)
    except UserError as err:
        sys.exit(f"error: {err}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **result}, indent=1))


if __name__ == "__main__":
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # after it: the fit arguments of `until`
    args = get_args_parser().parse_args(argv[:cut])
    args.fit_args = argv[cut + 1 :]
    main(args)
