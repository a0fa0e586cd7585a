"""The commands as users run them, each in its own process, timed end to end.

    python scripts/speed_e2e.py compare --data-dir ../shared/cifar10-jpeg --rounds 3 --steps 50 400
    python scripts/speed_e2e.py --out f.json until 0.665 -- --config configs/seed_bn.yaml --data.data_dir DIR

compare: the seed's loop (benchmark.py --only a), `lit-cifar fit` and `... --config configs/seed.yaml`,
alternating, for SHORT and LONG steps: img/s = (LONG - SHORT) x 64 / the difference of the wall times.
until: one `lit-cifar fit` (arguments after `--`): seconds of training until val/acc first >= TARGET.
"""

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from operator import truediv
from pathlib import Path

from benchmark import device_name, now  # scripts/benchmark.py
from lightning.pytorch import Callback

from lit_cifar.cli import LitCifarCLI
from lit_cifar.errors import ArgumentParser, boundary


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the times and results as JSON to this file")
    modes = parser.add_subparsers(dest="mode", required=True)
    compare = modes.add_parser("compare", help="the seed's loop against lit-cifar fit, in processes")
    compare.add_argument("--data-dir", required=True)
    compare.add_argument("--rounds", type=int, default=3)
    compare.add_argument("--steps", type=int, nargs=2, default=[50, 400], metavar=("SHORT", "LONG"))
    until = modes.add_parser("until", help="one fit run: seconds of training until val/acc >= TARGET")
    until.add_argument("target", type=float, help="val/acc to reach, e.g. 0.665")
    return parser


def compare(args: argparse.Namespace) -> dict:
    here, data_dir = Path(__file__).resolve().parent, Path(args.data_dir).resolve()  # they run elsewhere
    steps, config = "--trainer.max_steps", f"--config={here.parent}/configs/seed.yaml"
    fit = [sys.executable, "-m", "lit_cifar.cli", "fit", f"--data.data_dir={data_dir}"]  # `lit-cifar fit`
    seed = [sys.executable, f"{here}/benchmark.py", f"--data-dir={data_dir}", "--only=a", "--steps"]
    commands = {  # each ends with its flag for the number of steps
        "seed loop (benchmark.py --only a)": seed,
        "lit-cifar fit (default recipe)": [*fit, steps],
        "lit-cifar fit --config configs/seed.yaml": [*fit, config, steps],
    }
    walls = {name: {n: [] for n in args.steps} for name in commands}
    with tempfile.TemporaryDirectory() as cwd:  # lit-cifar's logs and checkpoints land here
        for cmd in commands.values():  # untimed: files into the page cache, modules compiled
            subprocess.run([*cmd, "1"], cwd=cwd, capture_output=True)
        for r, n, (name, cmd) in itertools.product(range(args.rounds), args.steps, commands.items()):
            start = time.perf_counter()
            proc = subprocess.run([*cmd, str(n)], cwd=cwd, capture_output=True, text=True)
            walls[name][n].append(time.perf_counter() - start)
            if proc.returncode:
                sys.exit(f"error: {' '.join(cmd)} {n} failed:\n{proc.stderr[-3000:]}")
            print(f"round {r + 1}/{args.rounds}: {name}, {n} steps: {walls[name][n][-1]:.1f} s", flush=True)
    (short, long), speeds, ratios = args.steps, {}, {}
    print(f"\neach command its own process | {args.data_dir} | batch 64 | {device_name('cpu')}")
    print(f"{'command':<44}{'img/s median':>13}{'min':>7}{'max':>7}{'x seed loop':>13}")
    for name, w in walls.items():  # the seed's loop first
        s = speeds[name] = [(long - short) * 64 / (b - a) for a, b in zip(w[short], w[long], strict=True)]
        ratios[name] = statistics.median(map(truediv, s, next(iter(speeds.values()))))
        print(f"{name:<44}{statistics.median(s):>13.0f}{min(s):>7.0f}{max(s):>7.0f}{ratios[name]:>13.2f}")
    return {"walls": walls, "speeds": speeds, "ratios": ratios}


class EpochTimes(Callback):
    """Seconds of each training epoch (validation excluded, the device synced) and val/acc after it."""

    def __init__(self) -> None:
        self.start, self.train_s, self.val_acc = None, [], []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = now(pl_module.device.type)

    def on_validation_start(self, trainer, pl_module) -> None:  # once an epoch, as the recipes validate
        if not trainer.sanity_checking:
            self.train_s.append(now(pl_module.device.type) - self.start)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after validation
        self.val_acc.append(float(trainer.callback_metrics.get("val/acc", float("nan"))))


def until(args: argparse.Namespace) -> dict:
    cli, epochs = LitCifarCLI(args=args.fit_args, run=False), EpochTimes()
    cli.trainer.callbacks.append(epochs)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    totals, accs = list(itertools.accumulate(epochs.train_s)), epochs.val_acc
    i = next((i for i, acc in enumerate(accs) if acc >= args.target), None)  # the first epoch that reached it
    reached = None if i is None else {"epoch": i + 1, "train_s": totals[i], "val_acc": accs[i]}
    when = f"epoch {i + 1}, after {totals[i]:.2f} s of training" if reached else "never"
    print("val/acc per epoch:", *(f"{a:.4f}" for a in accs), f"| first >= {args.target}: {when}")
    return dict(epoch_train_s=epochs.train_s, epoch_val_acc=epochs.val_acc, reached=reached)


if __name__ == "__main__":
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)  # after it: `until`'s fit arguments
    args = get_args_parser().parse_args(sys.argv[1:cut])
    args.fit_args = sys.argv[cut + 1 :]
    with boundary():
        result = compare(args) if args.mode == "compare" else until(args)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **result}, indent=1))
