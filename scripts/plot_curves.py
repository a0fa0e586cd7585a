"""Val accuracy per epoch from TensorBoard logs: a markdown table and a plot of the curves.
Each folder below ROOT with event files is a run, named by its path:

    python scripts/plot_curves.py runs/accuracy --only seed-exact s1-reflect --output docs/curves.png
"""

from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no GUI backend to choose
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_cifar.errors import ArgumentParser, UserError, boundary


def read_run(log_dir: Path, tag: str) -> tuple[list[float], float]:  # (value per epoch, seconds logged)
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    scalars = {t: acc.Scalars(t) for t in acc.Tags()["scalars"]}
    # a validate/test run after fit ends logs beyond fit's last step: not an epoch
    end = scalars["train/loss_epoch"][-1].step if "train/loss_epoch" in scalars else float("inf")
    times = [e.wall_time for events in scalars.values() for e in events]
    return [e.value for e in scalars.get(tag, []) if e.step <= end], max(times) - min(times)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="the folder of the runs")
    parser.add_argument("--only", nargs="*", help="plot only these runs (names as printed)")
    parser.add_argument("--output", help="PNG file for the plot")
    parser.add_argument("--tag", default="val/acc")
    args = parser.parse_args(argv)
    root, tag = args.root, args.tag
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give the folder that holds the runs' TensorBoard logs.")
    logs = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    runs = {str(d.relative_to(root)).split("/lightning_logs")[0]: read_run(d, tag) for d in logs}
    if not (runs := {name: run for name, run in runs.items() if run[0]}):
        raise UserError(f"no run under {root} logged {tag}: give the folder of runs that did (--tag TAG).")
    print(f"| run | epochs | best {tag} (epoch) | final {tag} | logged s |\n|---|---|---|---|---|")
    for name, (curve, seconds) in runs.items():
        best = curve.index(max(curve))
        print(f"| {name} | {len(curve)} | {curve[best]:.4f} ({best + 1}) | {curve[-1]:.4f} | {seconds:.0f} |")
    if args.output:
        ax = Figure(figsize=(7, 4.5), layout="tight").subplots()
        for name in [n for n in runs if not args.only or n in args.only]:
            ax.plot(range(1, len(runs[name][0]) + 1), runs[name][0], marker=".", label=name)
        ax.set(xlabel="epoch", ylabel=tag, title=f"{tag} per epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.figure.savefig(args.output, dpi=120)
        print(f"plot: {args.output}")


if __name__ == "__main__":
    with boundary():
        main()
