"""Val accuracy per epoch from TensorBoard logs: a markdown table and a plot of the curves.

    python scripts/plot_curves.py runs/accuracy --output docs/curves.png
    python scripts/plot_curves.py runs/accuracy --only seed-exact s1-reflect --output docs/curves.png

Each folder below ROOT that holds TensorBoard event files is one run, named by its path.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lit_cifar.errors import ArgumentParser, UserError, boundary


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="folder holding one sub-folder of logs per run")
    parser.add_argument("--only", nargs="*", help="plot only these runs (names as printed)")
    parser.add_argument("--output", help="PNG file for the plot")
    parser.add_argument("--tag", default="val/acc")
    return parser


def read_runs(root: Path, tag: str) -> dict[str, tuple[list[float], float]]:
    """{run name: (value per epoch, seconds from first to last event)}"""
    runs = {}
    for log_dir in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
        acc.Reload()
        if tag not in acc.Tags()["scalars"]:
            continue
        events = acc.Scalars(tag)
        if "train/loss_epoch" in acc.Tags()["scalars"]:  # drop a validate/test run after fit ends
            last_train_step = acc.Scalars("train/loss_epoch")[-1].step
            events = [e for e in events if e.step <= last_train_step]
        times = [e.wall_time for t in acc.Tags()["scalars"] for e in acc.Scalars(t)]
        name = str(log_dir.relative_to(root)).split("/lightning_logs")[0]
        if events:
            runs[name] = ([e.value for e in events], max(times) - min(times))
    return runs


def main(args: argparse.Namespace) -> None:
    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give the folder that holds the runs' TensorBoard logs.")
    runs = read_runs(root, args.tag)
    if not runs:
        raise UserError(
            f"no run under {root} logged {args.tag}: give the folder of runs that did (--tag TAG)."
        )
    print(f"| run | epochs | best {args.tag} (epoch) | final {args.tag} | logged s |")
    print("|---|---|---|---|---|")
    for name, (values, seconds) in runs.items():
        best = max(range(len(values)), key=values.__getitem__)
        print(
            f"| {name} | {len(values)} | {values[best]:.4f} ({best + 1}) | {values[-1]:.4f} | {seconds:.0f} |"
        )
    if args.output:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, (values, _) in runs.items():
            if not args.only or name in args.only:
                ax.plot(range(1, len(values) + 1), values, marker=".", label=name)
        ax.set(xlabel="epoch", ylabel=args.tag, title=f"{args.tag} per epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.output, dpi=120)
        print(f"plot: {args.output}")


if __name__ == "__main__":
    with boundary():
        main(get_args_parser().parse_args())
