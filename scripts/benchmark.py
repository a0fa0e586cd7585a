"""Training throughput, side by side: the seed's loop, our fast data path, our Lightning run, the bare step.

    python scripts/benchmark.py                                  # synthetic CIFAR-shaped data, CPU
    python scripts/benchmark.py --data-dir ../shared/cifar10-jpeg --rounds 5
    python scripts/benchmark.py --device cuda --batch-size 512 --precision bf16-mixed --compile
    python scripts/benchmark.py --cli --data-dir ../shared/cifar10-jpeg    # the real commands, end to end
    python scripts/benchmark.py --recipe configs/seed.yaml --data-dir DIR --device cuda  # one full run

In one process, on one device, with the same net, batch size and precision:
  (a) the seed's loop: plain PyTorch over torchvision's per-sample DataLoader (PIL -> ToTensor),
  (b) a plain PyTorch loop over our fast data path (TensorLoader + random_crop_flip + normalize),
  (c) our Lightning training: CIFARClassifier + CIFARDataModule through L.Trainer, project defaults,
  (d) the limit: the bare training step repeated on one batch already in memory, in each memory
      format (the faster one is the limit).
Everything runs inside one Trainer.fit of (c): each round times a window of its steps, then a
callback runs one window of a, b and d, so the paths alternate within seconds and share the
machine's noise. A window is --warmup untimed steps, then --steps timed ones (images/s, device
synced at both ends). Ratios are the median over rounds of each round's ratio; rounds in which
other processes used the CPU are left out (--max-others). (a) is the seed as written: contiguous
tensors, no compile, plain AdamW, `loss.item()` every step; --channels-last and --compile apply to
b, c, d. On CUDA one more window of (c) counts its host-device syncs.

--cli times the commands users run, each in its own process: `lit-cifar fit` (validation off) vs the
seed loop. Each runs for two step counts; images/s = extra images / extra wall time, which cancels
start-up (imports, data loading, model summary) exactly; start-up is the rest.

--recipe trains one config (a LightningCLI YAML's model/data/trainer sections, plus --set overrides)
through the same classes (no jsonargparse needed), and reports fit time, training time and val accuracy.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import instantiate_class
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from lit_cifar import sources
from lit_cifar.callbacks import TensorBoardDashboard
from lit_cifar.cli import (
    CHECKPOINT_DEFAULTS,
    LAST_CHECKPOINT_DEFAULTS,
    PROGRESS_BAR_REFRESH_RATE,
    TRAINER_DEFAULTS,
)
from lit_cifar.data import CIFARDataModule, TensorLoader, random_crop_flip
from lit_cifar.errors import UserError
from lit_cifar.guards import DivergenceGuard
from lit_cifar.module import CIFARClassifier
from lit_cifar.nets import build_net

PATHS = {
    "a": "seed loop: DataLoader, PIL -> ToTensor",
    "b": "plain loop, fast data path",
    "c": "Lightning: CIFARClassifier + DataModule",
    "d_cl": "bare step, one batch, channels_last",
    "d_nchw": "bare step, one batch, contiguous",
}
SEED_LR, SEED_WEIGHT_DECAY = 1e-3, 1e-4  # the seed's AdamW, as it wrote it


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        help="model.*, data.* (and, for --recipe, trainer.*) settings, values in YAML, e.g. data.augment=false",
    )
    parser.add_argument("--seed-workers", type=int, default=0, help="DataLoader workers of the seed loop")
    parser.add_argument("--cli", action="store_true", help="time the real commands end to end instead")
    parser.add_argument(
        "--cli-steps", type=int, nargs=2, default=[100, 400], metavar=("N1", "N2"), help="--cli step counts"
    )
    parser.add_argument("--recipe", help="a YAML config: train it once and report time and val accuracy")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument("--seed-loop-steps", type=int, help=argparse.SUPPRESS)  # --cli's seed process
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
    """What torchvision's CIFAR10 dataset does per sample: HWC uint8 -> PIL image -> transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3)
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def seed_dataset(data_dir: str, checksums: dict[str, str] | None) -> Dataset:
    """The training set as a seed user loads it: torchvision, one PIL image at a time, ToTensor."""
    if sources.is_image_folder(data_dir):
        return ImageFolder(str(Path(data_dir) / "train"), transform=transforms.ToTensor())
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


def trainer_defaults(log_dir: str) -> dict:
    """The project's Trainer defaults (lit_cifar/cli.py), instantiated, the logger writing under log_dir."""
    kwargs = dict(TRAINER_DEFAULTS)
    for key, value in kwargs.items():
        if isinstance(value, dict) and "class_path" in value:
            init = {**value, "init_args": {**value.get("init_args", {})}}
            if "save_dir" in init["init_args"]:
                init["init_args"]["save_dir"] = log_dir
            kwargs[key] = instantiate_class((), init)
        elif isinstance(value, list):
            kwargs[key] = [instantiate_class((), v) for v in value]
    kwargs["callbacks"] = [TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_RATE)]  # the CLI's bar
    return kwargs


def lightning_rounds(
    bench: Bench, model: CIFARClassifier, dm: CIFARDataModule, precision: str, log_dir: str, rounds: Rounds
) -> dict | None:
    """(c) One Trainer.fit with the project's defaults (validation and checkpointing off, as when
    timing the CLI), long enough for every round; returns the syncs counted on CUDA."""
    kwargs = trainer_defaults(log_dir)
    kwargs.pop("max_epochs", None)  # max_steps alone ends the run
    # the CLI's per-step callbacks (not its checkpoints: off, nor its dashboard: validation only)
    kwargs["callbacks"] += [LearningRateMonitor(), DivergenceGuard(), rounds]
    trainer = L.Trainer(
        **kwargs,
        accelerator=bench.device.type,
        devices=1,
        precision=precision,
        max_steps=(rounds.rounds + rounds.count_syncs) * (bench.warmup + bench.steps),
        limit_val_batches=0,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    if not rounds.count_syncs:
        return None
    where = Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"steps": bench.steps, "total": sum(where.values()), "where": dict(where.most_common(8))}


# ---------------------------------------------------------------------------- the modes


def parse_sets(pairs: list[str]) -> dict[str, dict]:
    """["model.lr=0.01", "data.augment=false"] -> {"model": {"lr": 0.01}, "data": {"augment": False}}."""
    out: dict[str, dict] = {"model": {}, "data": {}, "trainer": {}}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in out or not name:
            raise UserError(
                f"--set {pair!r}: expected model.NAME=VALUE, data.NAME=VALUE or trainer.NAME=VALUE."
            )
        out[section][name] = _number(value) if _number(value) is not None else yaml.safe_load(value)
    return out


def _number(text: str) -> int | float | None:
    """A number when the text is one: 4e-3 -> 0.004 (PyYAML, following YAML 1.1, reads a string)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def build(args: argparse.Namespace, data_dir: str, checksums: dict | None, sets: dict):
    """The data module (set up) and model kwargs shared by b, c, d (and --recipe)."""
    dm = CIFARDataModule(data_dir=data_dir, batch_size=args.batch_size, checksums=checksums, **sets["data"])
    dm.prepare_data()
    dm.setup("fit")
    model_kwargs = {**sets["model"], "num_classes": dm.num_classes}
    if args.channels_last is not None:
        model_kwargs["channels_last"] = args.channels_last
    if args.compile:
        model_kwargs["compile"] = True
    return dm, model_kwargs


def new_model(model_kwargs: dict, device: torch.device, **overrides) -> CIFARClassifier:
    model = CIFARClassifier(**{**model_kwargs, **overrides}).to(device)
    model.configure_model()
    return model


def benchmark(args: argparse.Namespace, data_dir: str, checksums: dict | None, log_dir: str) -> dict:
    """Rounds of c, a, b, d in turn; returns {"speeds": {path: [img/s per round]}, "ratios": ...}."""
    bench, sets = Bench(args), parse_sets(args.set)
    dm, model_kwargs = build(args, data_dir, checksums, sets)
    x, y = (t.to(bench.device) for t in dm.data["train"])
    loader = DataLoader(
        seed_dataset(data_dir, checksums), args.batch_size, shuffle=True, num_workers=args.seed_workers
    )
    seed_net = build_net(model_kwargs.get("net", "seed"), dm.num_classes).to(bench.device)
    ours = new_model(model_kwargs, bench.device)  # b and c train the same module
    channels_last = ours.hparams.channels_last
    # d: one batch as b makes it, in each memory format; the model in b/c's format is reused.
    # Compiled, only that one: a second compiled copy would cost as long again to compile.
    batch = next(iter(fast_batches(dm, x, y, args.batch_size)))
    bare = {}
    formats = (("d_cl", True), ("d_nchw", False))
    for name, fmt in [f for f in formats if not args.compile or f[1] == channels_last]:
        model = ours if fmt == channels_last else new_model(model_kwargs, bench.device, channels_last=fmt)
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
    rounds = Rounds(bench, others, args.rounds, count_syncs=bench.device.type == "cuda")
    syncs = lightning_rounds(bench, ours, dm, args.precision, log_dir, rounds)
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


def seed_loop_only(args: argparse.Namespace) -> None:
    """--cli's seed process: the seed loop for exactly --seed-loop-steps steps, then exit."""
    bench = Bench(args)
    bench.warmup, bench.steps = 0, args.seed_loop_steps
    dataset = seed_dataset(args.data_dir, None)
    loader = DataLoader(dataset, args.batch_size, shuffle=True, num_workers=args.seed_workers)
    num_classes = len(getattr(dataset, "classes", range(10)))  # an image folder brings its own
    seed_loop(bench, loader, build_net("seed", num_classes).to(bench.device))


def cli_benchmark(args: argparse.Namespace) -> dict:
    """The real commands, each in its own process, at two step counts; alternating, --rounds times."""
    if not args.data_dir:
        raise UserError("--cli times `lit-cifar fit` on a real folder: give --data-dir.")
    data_dir = str(Path(args.data_dir).resolve())  # the commands run in a temporary folder
    common = ["--batch-size", str(args.batch_size), "--precision", args.precision, "--device", args.device]

    def seed_cmd(n: int) -> list[str]:
        return [sys.executable, __file__, "--data-dir", data_dir, *common, "--seed-loop-steps", str(n)]

    def lit_cmd(n: int) -> list[str]:
        return [
            sys.executable, "-m", "lit_cifar.cli", "fit",  # the `lit-cifar` command, same interpreter
            "--data.data_dir", data_dir,
            "--data.batch_size", str(args.batch_size),
            "--trainer.precision", args.precision,
            "--trainer.accelerator", args.device,
            "--trainer.devices", "1",
            "--trainer.limit_val_batches", "0",
            "--trainer.max_steps", str(n),
        ]  # fmt: skip

    cmds = {"a": seed_cmd, "c": lit_cmd}
    n1, n2 = args.cli_steps
    walls: dict[str, dict[int, list[float]]] = {k: {n: [] for n in args.cli_steps} for k in cmds}
    others: list[float] = []  # CPU cores other processes used, per round
    with tempfile.TemporaryDirectory() as cwd:  # lit-cifar's logs and checkpoints land here
        for r in range(args.rounds):
            load = OthersLoad()
            for n in args.cli_steps:
                for name, cmd in cmds.items():
                    start = time.perf_counter()
                    proc = subprocess.run(cmd(n), cwd=cwd, capture_output=True, text=True)
                    walls[name][n].append(time.perf_counter() - start)
                    if proc.returncode:
                        raise UserError(f"{' '.join(cmd(n))} failed:\n{proc.stderr[-2000:]}")
            others.append(load.cores())
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {n} steps {v[n][-1]:.1f} s" for k, v in walls.items() for n in args.cli_steps
            ) + f" | other processes: {others[-1]:.2f} cores")  # fmt: skip
    # Per round: images/s = extra images / extra wall time (start-up cancels); medians over quiet rounds.
    kept = [r for r, cores in enumerate(others) if not cores > args.max_others]
    if not kept:
        print(f"NOISY: other processes used over {args.max_others} cores in every round: all rounds kept")
        kept = list(range(args.rounds))
    speeds = {
        name: [(n2 - n1) * args.batch_size / (w[n2][r] - w[n1][r]) for r in range(args.rounds)]
        for name, w in walls.items()
    }
    result = {"others_cores": others, "kept_rounds": kept}
    for name, w in walls.items():
        speed = statistics.median(speeds[name][r] for r in kept)
        startup = statistics.median(w[n1][r] for r in kept) - n1 * args.batch_size / speed
        result[name] = {"walls": w, "speeds": speeds[name], "images_per_s": speed, "startup_s": startup}
    result["c/a"] = statistics.median(speeds["c"][r] / speeds["a"][r] for r in kept)
    print(
        f"\nend to end, device {args.device} ({_device_name(args.device)}) | {args.data_dir} | batch "
        f"{args.batch_size} | precision {args.precision} | runs at {n1} and {n2} steps, median of {len(kept)} "
        f"of {args.rounds} rounds (other processes below {args.max_others} cores)"
    )
    print(f"{'command':<58}{'img/s':>10}{'start-up s':>12}")
    for name, label in (("a", "seed loop (its own process)"), ("c", "lit-cifar fit, validation off")):
        print(f"({name}) {label:<54}{result[name]['images_per_s']:>10.0f}{result[name]['startup_s']:>12.1f}")
    print(
        f"ratio c/a {result['c/a']:.2f}, median of the rounds' ratios   (img/s = {(n2 - n1) * args.batch_size} "
        f"images / wall-time difference)"
    )
    return result


class EpochTimes(Callback):
    """Wall time of each training epoch's batches (validation excluded, device synced) and the
    val/acc after each epoch."""

    def __init__(self, bench: Bench) -> None:
        self.bench, self.start, self.train_s, self.val_acc = bench, None, [], []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.bench.sync()
        self.start = time.perf_counter()

    def _stop(self) -> None:
        if self.start is not None:
            self.bench.sync()
            self.train_s.append(time.perf_counter() - self.start)
            self.start = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._stop()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # the epoch's metrics are computed by now
            self.val_acc.append(float(trainer.callback_metrics["val/acc"]))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()


def recipe(args: argparse.Namespace, data_dir: str, checksums: dict | None, log_dir: str) -> dict:
    """Train one config as the CLI would (its logger and callbacks) and time it."""
    config = yaml.safe_load(Path(args.recipe).read_text()) or {}
    sets = parse_sets(args.set)
    for section in sets:
        sets[section] = {**(config.get(section) or {}), **sets[section]}
    bench = Bench(args)
    args.batch_size = sets["data"].pop("batch_size", args.batch_size)
    dm, model_kwargs = build(args, data_dir, checksums, sets)
    model = CIFARClassifier(**model_kwargs, class_names=dm.classes)
    epochs = EpochTimes(bench)
    kwargs = trainer_defaults(log_dir)
    # the callbacks the CLI adds (lit_cifar/cli.py), with their defaults
    kwargs["callbacks"] += [
        ModelCheckpoint(**CHECKPOINT_DEFAULTS),
        ModelCheckpoint(**LAST_CHECKPOINT_DEFAULTS),
        LearningRateMonitor(),
        DivergenceGuard(),
        TensorBoardDashboard(),
        epochs,
    ]
    kwargs.update(sets["trainer"])
    kwargs.setdefault("precision", args.precision)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(**kwargs, accelerator=bench.device.type, devices=1)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - start
    result = {
        "recipe": args.recipe,
        "settings": {k: v for k, v in sets.items()} | {"batch_size": args.batch_size},
        "fit_s": fit_s,
        "train_s": sum(epochs.train_s),
        "epoch_train_s": epochs.train_s,
        "epoch_val_acc": epochs.val_acc,
        "epochs": trainer.current_epoch,
        "val_acc_best": float(trainer.callback_metrics.get("val/acc_best", float("nan"))),
        "val_acc_last": float(trainer.callback_metrics.get("val/acc", float("nan"))),
    }
    print(
        f"\nrecipe {args.recipe} {' '.join(args.set)} | device {args.device} ({_device_name(args.device)})\n"
        f"fit {fit_s:.1f} s (train {result['train_s']:.1f} s over {result['epochs']} epochs, first "
        f"{epochs.train_s[0] if epochs.train_s else float('nan'):.2f} s) | val/acc best "
        f"{result['val_acc_best']:.4f}, last {result['val_acc_last']:.4f}"
    )
    return result


def main(args: argparse.Namespace) -> None:
    try:
        if min(args.rounds, args.steps, args.warmup, args.batch_size) < 1:
            raise UserError("--rounds, --steps, --warmup and --batch-size must be at least 1.")
        if args.seed_loop_steps is not None:
            return seed_loop_only(args)
        if args.cli:
            result = cli_benchmark(args)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                checksums, data_desc = None, args.data_dir
                data_dir = args.data_dir
                if data_dir is None:
                    data_dir = tmp
                    checksums = synthetic_data(Path(tmp))
                    data_desc = (
                        "SYNTHETIC random CIFAR-shaped set (50,000 images; give --data-dir for real data)"
                    )
                    print(f"no --data-dir: using a {data_desc}")
                log_dir = str(Path(tmp) / "logs")
                if args.recipe:
                    result = recipe(args, data_dir, checksums, log_dir)
                else:
                    result = benchmark(args, data_dir, checksums, log_dir)
                    print_table(args, data_desc, result)
        if args.out:
            result = {"args": vars(args), "device_name": _device_name(args.device), **result}
            Path(args.out).write_text(json.dumps(result, indent=1))
    except UserError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
