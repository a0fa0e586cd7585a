"""Training throughput in one process: the seed's loop, our fast data path, our Lightning run, the bare step.

    python scripts/benchmark.py                                  # synthetic CIFAR-shaped data, CPU
    python scripts/benchmark.py --data-dir ../shared/cifar10-jpeg --rounds 10 --steps 30
    python scripts/benchmark.py --device cuda --batch-size 512 --precision bf16-mixed --compile
    python scripts/benchmark.py --data-dir DIR --only a --steps 450   # the seed's loop alone, then exit

In one process, on one device, with the same net, batch size and precision:
  (a) the seed's loop as the seed ran it: the training images in memory as one uint8 array
      (N, 32, 32, 3), as torchvision's CIFAR10 holds them; per sample PIL.Image.fromarray ->
      ToTensor(); DataLoader(batch_size, shuffle=True); AdamW(lr 1e-3, weight decay 1e-4),
      CrossEntropyLoss, the running loss read every step; contiguous tensors, no compile,
  (b) a plain PyTorch loop over our fast data path (TensorLoader + random_crop_flip + normalize),
  (c) our Lightning training: CIFARClassifier + CIFARDataModule through L.Trainer, project defaults,
  (d) the limit: the bare training step repeated on one batch already in memory, in each memory
      format (the faster one is the limit).
Everything runs inside one Trainer.fit of (c): each round times a window of its steps, then a
callback runs one window of a, b and d, so the paths alternate within seconds and share the
machine's noise. A window is --warmup untimed steps, then --steps timed ones (images/s, device
synced at both ends). Ratios are the median over rounds of each round's ratio; rounds in which
other processes used the CPU are left out (--max-others). --channels-last and --compile apply to
b, c, d. On CUDA one more window of (c) counts its host-device syncs. The commands as users run
them, each in its own process, are timed by scripts/speed_e2e.py.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import statistics
import tempfile
import time
import warnings
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from lit_cifar import sources
from lit_cifar.cli import LitCifarCLI
from lit_cifar.data import CIFARDataModule
from lit_cifar.errors import ArgumentParser, UserError, boundary
from lit_cifar.loaders import TensorLoader, random_crop_flip
from lit_cifar.module import CIFARClassifier
from lit_cifar.nets import build_net

PATHS = {
    "a": "seed loop: DataLoader, PIL -> ToTensor",
    "b": "plain loop, fast data path",
    "c": "lit-cifar fit's classes, in-process",
    "d_cl": "bare step, one batch, channels_last",
    "d_nchw": "bare step, one batch, contiguous",
}
SEED_LR, SEED_WEIGHT_DECAY = 1e-3, 1e-4  # the seed's AdamW, as it wrote it


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", help="a CIFAR folder in any supported form; default: synthetic data")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="NHWC for b, c, d (default: CIFARClassifier's)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the net for b, c, d")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (each path once per round)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per path per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each timed window")
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.1,
        help="leave out rounds in which other processes used more CPU cores than this (noise)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="model.* and data.* settings for b, c, d, values in YAML, e.g. data.augment=false",
    )
    parser.add_argument(
        "--only",
        choices=["a"],
        help="a: run the seed's loop alone for --steps steps (no warm-up, no timing) and exit, "
        "as the seed's own script would (scripts/speed_e2e.py times it as a process)",
    )
    parser.add_argument("--out", help="also write the results as JSON to this file")
    return parser


# ---------------------------------------------------------------------------- data


def synthetic_data(root: Path, n: int = 50_000) -> dict[str, str]:
    """A random CIFAR-shaped set in cifar-10-batches-py form under root; returns its md5s."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        size = 1_000 if name == "test_batch" else n // 5
        entry = {
            "data": torch.randint(0, 256, (size, 3072), generator=g, dtype=torch.uint8).numpy(),
            "labels": torch.randint(0, 10, (size,), generator=g).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"label_names": [f"class_{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


class PILArrays(Dataset):
    """What torchvision's CIFAR10 dataset does per sample: HWC uint8 -> PIL image -> transform.

    CIFAR10 keeps its pickles' (N, 3, 32, 32) array as a transposed (N, 32, 32, 3) view, as here."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3)
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def seed_dataset(data_dir: str, checksums: dict[str, str] | None) -> Dataset:
    """The whole training set as the seed loads it (torchvision's CIFAR10): decoded once, in memory,
    one PIL image at a time through ToTensor. (From an image folder: its decoded cache.)"""
    x, y = sources.load(data_dir, "cifar10", checksums)["train"]
    return PILArrays(x, y, transforms.ToTensor())


# ---------------------------------------------------------------------------- timing helpers


class Bench:
    """Shared settings of every path: device, precision, step counts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        self.batch_size, self.steps, self.warmup = args.batch_size, args.steps, args.warmup
        bf16 = args.precision == "bf16-mixed"
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if bf16
            else contextlib.nullcontext
        )

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, step, batches) -> float:
        """images/s of `step(batch)` over `steps` batches after `warmup` untimed ones."""
        it = iter(batches)
        for _ in range(self.warmup):
            step(next(it))
        self.sync()
        start = time.perf_counter()
        for _ in range(self.steps):
            step(next(it))
        self.sync()
        return self.steps * self.batch_size / (time.perf_counter() - start)


class OthersLoad:
    """CPU used by other processes since creation, in cores (Linux /proc/stat; nan elsewhere)."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), self._machine_busy_s(), self._own_s())

    @staticmethod
    def _machine_busy_s() -> float:
        try:
            user, nice, system, _idle, _iowait, irq, softirq = map(
                int, Path("/proc/stat").read_text().split()[1:8]
            )
        except (OSError, ValueError):
            return float("nan")
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()  # this process and its finished children (DataLoader workers, --cli's commands)
        return t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float:
        wall, busy, own = self.start
        return (self._machine_busy_s() - busy - (self._own_s() - own)) / (time.perf_counter() - wall)


def _forever(make_iter):
    while True:
        yield from make_iter()


def seed_loop(bench: Bench, loader: DataLoader, model: nn.Module) -> float:
    """(a) The seed's loop as written: .to(device) per batch, zero_grad, step, loss.item()."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=SEED_LR, weight_decay=SEED_WEIGHT_DECAY)
    running_loss = 0.0

    def step(batch) -> None:
        nonlocal running_loss
        inputs, labels = batch[0].to(bench.device), batch[1].to(bench.device)
        optimizer.zero_grad()
        with bench.autocast():
            loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()

    model.train()
    return bench.run(step, _forever(lambda: iter(loader)))


def plain_step(bench: Bench, model: CIFARClassifier, total_steps: int = 10_000):
    """One training step of our module's net, loss, optimizer and schedule, without Lightning."""
    # configure_optimizers reads the run's length from the trainer: a stand-in gives it one.
    attached, model._trainer = model._trainer, SimpleNamespace(estimated_stepping_batches=total_steps)
    try:
        config = model.configure_optimizers()  # AdamW (fused on CUDA), maybe a per-step schedule
    finally:
        model._trainer = attached
    optimizer = config["optimizer"] if isinstance(config, dict) else config
    scheduler = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None
    smoothing = model.hparams.label_smoothing
    model.train()

    def step(batch) -> None:
        x, y = batch
        with bench.autocast():
            loss = nn.functional.cross_entropy(model(x), y, label_smoothing=smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    return step


def fast_batches(dm: CIFARDataModule, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """(b)'s data: TensorLoader batches on the device, cropped, flipped and normalized there."""
    hp = dm.hparams  # crops and flips drawn per batch by the loader, as in training
    augment = partial(random_crop_flip, padding=hp.crop_padding, padding_mode=hp.padding_mode)
    for images, labels in TensorLoader(
        x, y, batch_size, shuffle=True, augment=augment if hp.augment else None
    ):
        yield dm.to_float(images), labels


class Rounds(Callback):
    """The whole benchmark inside one Trainer.fit: each round times one window of Lightning's own
    steps (c), then calls one window of every other path from this hook, so the paths alternate
    within seconds and share the machine's noise. One last window (CUDA) counts host-device syncs."""

    def __init__(self, bench: Bench, others: dict, rounds: int, count_syncs: bool) -> None:
        self.bench, self.others, self.rounds, self.count_syncs = bench, others, rounds, count_syncs
        self.speeds: dict[str, list[float]] = {"c": [], **{name: [] for name in others}}
        self.others_cores: list[float] = []  # CPU cores other processes used, per round
        self.step, self.start, self.load = 0, 0.0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # self.step counts across epochs (batch_idx restarts each epoch)
        r, pos = divmod(self.step, self.bench.warmup + self.bench.steps)
        self.step += 1
        if pos == self.bench.warmup - 1:  # the last warm-up step ends: start the clock
            self.bench.sync()
            self.load, self.start = OthersLoad(), time.perf_counter()
            if r == self.rounds:
                torch.cuda.set_sync_debug_mode("warn")  # every sync in this window warns
        elif pos == self.bench.warmup + self.bench.steps - 1:
            if r == self.rounds:
                torch.cuda.set_sync_debug_mode("default")
                return
            self.bench.sync()
            self.speeds["c"].append(
                self.bench.steps * self.bench.batch_size / (time.perf_counter() - self.start)
            )
            for name, run in self.others.items():
                self.speeds[name].append(run())
            self.others_cores.append(self.load.cores())
            bar = trainer.progress_bar_callback  # its print() keeps the line above the bar
            (bar.print if bar is not None else print)(
                f"round {r + 1}/{self.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in self.speeds.items())
                + f" | other processes: {self.others_cores[-1]:.2f} cores"
            )  # fmt: skip


def lit_cifar_fit(args: argparse.Namespace, data_dir: str, checksums: dict | None, log_dir: str, steps: int):
    """(c) is `lit-cifar fit` itself: the CLI's own classes (its Trainer defaults, logger, checkpoint
    callbacks, dashboard, guard, progress bar), built without running; validation off."""
    cli_args = [
        "--data.data_dir", data_dir,
        "--data.batch_size", str(args.batch_size),
        "--trainer.accelerator", args.device,
        "--trainer.devices", "1",
        "--trainer.precision", args.precision,
        "--trainer.max_steps", str(steps),
        "--trainer.max_epochs", "-1",
        "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", log_dir,
        *[f"--{pair}" for pair in args.set],  # model.NAME=VALUE, data.NAME=VALUE
    ]  # fmt: skip
    if checksums:
        cli_args += ["--data.checksums", json.dumps(checksums)]
    if args.channels_last is not None:
        cli_args += ["--model.channels_last", str(args.channels_last).lower()]
    if args.compile:
        cli_args += ["--model.compile", "true"]
    return LitCifarCLI(args=cli_args, run=False)


def benchmark(args: argparse.Namespace, data_dir: str, checksums: dict | None, log_dir: str) -> dict:
    """Rounds of c, a, b, d in turn; returns {"speeds": {path: [img/s per round]}, "ratios": ...}."""
    bench = Bench(args)
    count_syncs = bench.device.type == "cuda"
    cli = lit_cifar_fit(
        args, data_dir, checksums, log_dir, (args.rounds + count_syncs) * (args.warmup + args.steps)
    )
    ours, dm = cli.model, cli.datamodule  # b and c train the same module
    dm.prepare_data()
    dm.setup("fit")
    ours.to(bench.device).configure_model()
    x, y = (t.to(bench.device) for t in dm.data["train"])
    loader = DataLoader(seed_dataset(data_dir, checksums), args.batch_size, shuffle=True)
    seed_net = build_net("seed", dm.num_classes).to(bench.device)
    channels_last = ours.hparams.channels_last
    # d: one batch as b makes it, in each memory format; the model in b/c's format is reused.
    # Compiled, only that one: a second compiled copy would cost as long again to compile.
    batch = next(iter(fast_batches(dm, x, y, args.batch_size)))
    bare = {}
    formats = (("d_cl", True), ("d_nchw", False))
    for name, fmt in [f for f in formats if not args.compile or f[1] == channels_last]:
        model = ours
        if fmt != channels_last:
            kwargs = {
                k: v for k, v in ours.hparams.items() if not k.startswith("_")
            }  # not the CLI's _instantiator
            model = CIFARClassifier(**{**kwargs, "channels_last": fmt}).to(bench.device)
            model.configure_model()
        memory_format = torch.channels_last if fmt else torch.contiguous_format
        bare[name] = (model, (batch[0].contiguous(memory_format=memory_format), batch[1]))
    others = {
        "a": lambda: seed_loop(bench, loader, seed_net),
        "b": lambda: bench.run(
            plain_step(bench, ours), _forever(lambda: fast_batches(dm, x, y, args.batch_size))
        ),
        **{
            name: (lambda m=model, b=b: bench.run(plain_step(bench, m), _forever(lambda: iter([b]))))
            for name, (model, b) in bare.items()
        },
    }
    rounds = Rounds(bench, others, args.rounds, count_syncs)
    cli.trainer.callbacks.append(rounds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.trainer.fit(ours, datamodule=dm)
    syncs = None
    if count_syncs:
        where = Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
        syncs = {"steps": bench.steps, "total": sum(where.values()), "where": dict(where.most_common(8))}
    speeds, others = rounds.speeds, rounds.others_cores
    # Rounds in which other processes took CPU time are left out (all kept if none is quiet).
    quiet = [r for r, cores in enumerate(others) if not cores > args.max_others]
    kept = quiet or list(range(args.rounds))
    clean = {name: [v[r] for r in kept] for name, v in speeds.items()}
    best_d = max(bare, key=lambda k: statistics.median(clean[k]))
    speeds["d"], clean["d"] = speeds[best_d], clean[best_d]

    def ratio(num: str, den: str) -> float:
        return statistics.median(n / d for n, d in zip(clean[num], clean[den], strict=True))

    return {
        "speeds": speeds,
        "kept_rounds": kept,
        "quiet": bool(quiet),
        "median": {name: statistics.median(v) for name, v in clean.items()},
        "best_d": best_d,
        "channels_last": channels_last,
        "syncs": syncs,
        "others_cores": others,
        "ratios": {"c/a": ratio("c", "a"), "c/b": ratio("c", "b"), "c/d": ratio("c", "d")},
    }


def print_table(args: argparse.Namespace, data_desc: str, result: dict) -> None:
    print(
        f"\ndevice {args.device} ({_device_name(args.device)}) | data: {data_desc} | batch {args.batch_size} | "
        f"precision {args.precision} | channels_last (b,c,d) {result['channels_last']} | "
        f"compile (b,c,d) {args.compile} | {args.rounds} rounds x {args.steps} steps after {args.warmup}"
    )
    others, kept = result["others_cores"], result["kept_rounds"]
    if not math.isnan(others[0]):
        print(
            f"{len(kept)} of {len(others)} rounds kept (other processes below {args.max_others} cores); "
            f"other processes used {statistics.median(others):.2f} cores (median; max {max(others):.2f})"
            if result["quiet"]
            else f"NOISY: other processes used over {args.max_others} cores in every round (median "
            f"{statistics.median(others):.2f}): all rounds kept, the numbers are not trustworthy"
        )
    print(f"{'path':<46}{'img/s median':>14}{'min':>10}{'max':>10}")
    for name, label in [(n, label) for n, label in PATHS.items() if n in result["speeds"]]:
        s = [result["speeds"][name][r] for r in kept]
        print(f"({name[0]}) {label:<42}{result['median'][name]:>14.0f}{min(s):>10.0f}{max(s):>10.0f}")
    r = result["ratios"]
    print(
        f"ratios (median over kept rounds): c/a {r['c/a']:.2f}   c/b {r['c/b']:.2f}   c/d {r['c/d']:.2f}"
        f"   (d = {PATHS[result['best_d']]})"
    )
    if result["syncs"] is not None:
        syncs = result["syncs"]
        print(f"(c) host-device syncs in {syncs['steps']} steps: {syncs['total']}", *syncs["where"].items())


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    return "cpu"


def seed_only(args: argparse.Namespace, data_dir: str, checksums: dict | None) -> None:
    """--only a: the seed's loop for --steps steps, nothing else (its start-up included)."""
    bench = Bench(args)
    bench.warmup = 0
    loader = DataLoader(seed_dataset(data_dir, checksums), args.batch_size, shuffle=True)
    seed_loop(bench, loader, build_net("seed", 10).to(bench.device))


def main(args: argparse.Namespace) -> None:
    with boundary():
        if min(args.rounds, args.steps, args.warmup, args.batch_size) < 1:
            raise UserError("--rounds, --steps, --warmup and --batch-size must be at least 1.")
        with tempfile.TemporaryDirectory() as tmp:
            checksums, data_dir = None, args.data_dir
            data_desc = data_dir
            if data_dir is None:
                data_dir, checksums = tmp, synthetic_data(Path(tmp))
                data_desc = "SYNTHETIC random CIFAR-shaped set (50,000 images; give --data-dir for real data)"
                print(f"no --data-dir: using a {data_desc}")
            if args.only == "a":
                return seed_only(args, data_dir, checksums)
            result = benchmark(args, data_dir, checksums, str(Path(tmp) / "logs"))
            print_table(args, data_desc, result)
        if args.out:
            result = {"args": vars(args), "device_name": _device_name(args.device), **result}
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
