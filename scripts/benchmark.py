"""Training speed, in one process: the seed's loop, our data path, lit-cifar fit and the bare step.

    python scripts/benchmark.py --data-dir ../shared/cifar10-jpeg --rounds 8 --steps 30  # default: synthetic
    python scripts/benchmark.py --device cuda --batch-size 512 --precision bf16-mixed --compile
    python scripts/benchmark.py --data-dir DIR --only a --steps 450   # the seed's loop alone, then exit

(a) the seed's loop as it ran; (b) a plain loop over our data module's loader and module's step; (c)
`lit-cifar fit`'s classes, validation off; (d) b's step on one batch. Each round, in c's Trainer.fit,
times --steps of c's steps, then of a, b and d; ratios: medians over rounds. docs/benchmarks.md.
"""

import argparse
import hashlib
import itertools
import json
import os
import pickle
import statistics
import tempfile
import time
from operator import truediv
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import ToTensor

from lit_cifar.cli import LitCifarCLI
from lit_cifar.data import CIFARDataModule
from lit_cifar.errors import ArgumentParser, UserError, boundary
from lit_cifar.nets import build_net

PATHS = {"a": "the seed's loop", "b": "plain loop, our data path", "c": "lit-cifar fit", "d": "bare step"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="a CIFAR folder in any supported form; default: synthetic data")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the net for b, c, d")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (each path once per round)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per path per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each timed window")
    help = "model.* and data.* settings for b, c, d, values in YAML, e.g. data.augment=false"
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help)
    parser.add_argument("--only", choices=["a"], help="a: the seed's loop alone for --steps steps, then exit")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    return parser


def synthetic_data(root: Path, n: int = 50_000) -> dict[str, str]:
    """A random CIFAR-shaped set in cifar-10-batches-py form under root; returns its md5s."""
    folder, g = root / "cifar-10-batches-py", torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    for name, size in [*((f"data_batch_{i}", n // 5) for i in range(1, 6)), ("test_batch", 1_000)]:
        data = torch.randint(0, 256, (size, 3072), generator=g, dtype=torch.uint8).numpy()
        labels = torch.randint(0, 10, (size,), generator=g).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class_{i}" for i in range(10)]}))
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


class SeedImages(Dataset):
    """What torchvision's CIFAR10 does per sample: one (32, 32, 3) uint8 array -> PIL image -> ToTensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images.permute(0, 2, 3, 1).numpy(), labels.tolist()  # (N, 32, 32, 3)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return ToTensor()(Image.fromarray(self.images[i])), self.labels[i]


def now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(args: argparse.Namespace, step, batches) -> float:
    """images/s of `step` over --steps batches after --warmup untimed ones, the device synced at both ends."""
    for _ in range(args.warmup):
        step(next(batches))
    start = now(args.device)
    for _ in range(args.steps):
        step(next(batches))
    return args.steps * args.batch_size / (now(args.device) - start)


def autocast(args: argparse.Namespace) -> torch.autocast:  # c gets the same from Lightning's precision
    return torch.autocast(args.device, torch.bfloat16, enabled=args.precision == "bf16-mixed")


def seed_loop(args: argparse.Namespace, dm: CIFARDataModule) -> float:
    """(a) The seed's loop as written: .to(device) per batch, zero_grad, step, loss.item()."""
    loader = DataLoader(SeedImages(*dm.data["train"]), args.batch_size, shuffle=True)
    model = build_net("seed", dm.num_classes).to(args.device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    losses = []  # the seed's running loss

    def step(batch) -> None:
        inputs, labels = batch[0].to(args.device), batch[1].to(args.device)
        optimizer.zero_grad()
        with autocast(args):
            loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    model.train()
    return timed(args, step, itertools.chain.from_iterable(itertools.repeat(loader)))


def plain_step(args: argparse.Namespace, model):
    """(b, d) One training step of our module (its net, loss, optimizer, schedule) without Lightning."""
    config = model.configure_optimizers()  # in c's fit: the schedule reads the run's length from c's trainer
    optimizer = config["optimizer"] if isinstance(config, dict) else config
    scheduler = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None

    def step(batch) -> None:
        with autocast(args):
            loss = F.cross_entropy(model(batch[0]), batch[1], label_smoothing=model.hparams.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    return step


class Rounds(Callback):
    """Inside c's fit: after each timed window of c's own steps, one window of a, b and d."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.start = args, 0.0
        self.speeds: dict[str, list[float]] = {name: [] for name in PATHS}

    def on_train_start(self, trainer, pl_module) -> None:
        args, dm = self.args, trainer.datamodule
        loader = dm.train_dataloader()  # a loader like c's: the same data path, its own place in it

        def our_batches():  # (B, 3, 32, 32) uint8 -> float on the device, as Lightning hands them over
            for batch in itertools.chain.from_iterable(itertools.repeat(loader)):
                yield dm.on_after_batch_transfer([t.to(args.device) for t in batch], 0)

        self.others = {
            "a": lambda: seed_loop(args, dm),
            "b": lambda: timed(args, plain_step(args, pl_module), our_batches()),
            "d": lambda: timed(args, plain_step(args, pl_module), itertools.repeat(next(our_batches()))),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        args = self.args
        r, pos = divmod(trainer.global_step - 1, args.warmup + args.steps)  # global_step: steps done
        if pos == args.warmup - 1:  # the last warm-up step ends: start the clock
            self.start = now(args.device)
        elif pos == args.warmup + args.steps - 1:
            self.speeds["c"].append(args.steps * args.batch_size / (now(args.device) - self.start))
            for name, run in self.others.items():
                self.speeds[name].append(run())
            speeds = ", ".join(f"{k} {v[-1]:.0f}" for k, v in self.speeds.items())
            getattr(trainer.progress_bar_callback, "print", print)(f"round {r + 1}/{args.rounds}: {speeds}")


def others_cpu() -> tuple[float, float]:
    """(wall s, CPU s the other processes used so far), from Linux's /proc/stat (nan elsewhere)."""
    stat = Path("/proc/stat")
    ticks = [int(v) for v in stat.read_text().split()[1:8]] if stat.exists() else [float("nan")] * 7
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = os.times()  # this process and its finished children
    return time.perf_counter(), busy - own.user - own.system - own.children_user - own.children_system


def benchmark(args: argparse.Namespace, data_dir: str, checksums: dict | None, log_dir: str) -> dict:
    """Rounds of c, a, b, d; returns the img/s of each per round, their medians and the ratios."""
    cli_args = [  # (c) is `lit-cifar fit` itself: the CLI's own classes, built without running
        f"--data.data_dir={data_dir}", f"--data.batch_size={args.batch_size}", "--trainer.devices=1",
        f"--trainer.accelerator={args.device}", f"--trainer.precision={args.precision}",
        f"--trainer.max_steps={args.rounds * (args.warmup + args.steps)}",
        "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={log_dir}",
        f"--data.checksums={json.dumps(checksums)}", f"--model.compile={args.compile}",
        *[f"--{pair}" for pair in args.set],  # model.NAME=VALUE, data.NAME=VALUE
    ]  # fmt: skip
    cli, rounds = LitCifarCLI(args=cli_args, run=False), Rounds(args)
    cli.trainer.callbacks.append(rounds)
    start = others_cpu()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    end, speeds = others_cpu(), rounds.speeds
    return {
        "speeds": speeds,
        "median": {name: statistics.median(v) for name, v in speeds.items()},
        "ratios": {f"c/{d}": statistics.median(map(truediv, speeds["c"], speeds[d])) for d in "abd"},
        "channels_last": cli.model.hparams.channels_last,
        "device_name": device_name(args.device),
        "others_cores": (end[1] - start[1]) / (end[0] - start[0]),
    }


def print_table(args: argparse.Namespace, result: dict) -> None:
    print(
        f"\ndevice {args.device} ({result['device_name']}) | data: {args.data_dir or 'SYNTHETIC'} | "
        f"batch {args.batch_size} | precision {args.precision} | channels_last {result['channels_last']} | "
        f"compile {args.compile} | {args.rounds} rounds x {args.steps} steps after {args.warmup}\n"
        f"other processes used {result['others_cores']:.2f} CPU cores on average during the run\n"
        f"{'path':<46}{'img/s median':>14}{'min':>10}{'max':>10}"
    )
    for name, label in PATHS.items():
        s = result["speeds"][name]
        print(f"({name}) {label:<42}{result['median'][name]:>14.0f}{min(s):>10.0f}{max(s):>10.0f}")
    print("ratios (median over rounds): " + "   ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return f"{names[0] if names else 'cpu'}, {torch.get_num_threads()} threads"


def main(args: argparse.Namespace) -> None:
    with boundary(), tempfile.TemporaryDirectory() as tmp:
        if min(args.rounds, args.steps, args.warmup, args.batch_size) < 1:
            raise UserError("--rounds, --steps, --warmup and --batch-size must be at least 1.")
        data_dir, checksums = args.data_dir, None
        if data_dir is None:
            data_dir, checksums = tmp, synthetic_data(Path(tmp))
            print("no --data-dir: using a SYNTHETIC random CIFAR-shaped set (50,000 images)")
        if args.only == "a":  # the seed's loop for --steps steps, nothing else (its start-up included)
            dm = CIFARDataModule(data_dir, checksums=checksums)
            dm.prepare_data()
            dm.setup("fit")
            args.warmup = 0
            seed_loop(args, dm)
            return
        result = benchmark(args, data_dir, checksums, str(Path(tmp) / "logs"))
        print_table(args, result)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **result}, indent=1))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
