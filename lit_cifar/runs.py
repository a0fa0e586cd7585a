"""Run folders of the `lit-cifar` command (cli.py calls these): which run `--ckpt_path last` continues,
in its own log folder and with its own settings, and which folders a new run may write in."""

import glob
import os
import shutil
import sys
from pathlib import Path

import yaml

from lit_cifar.errors import UserError, check_writable, on_failure

# What a resumed run may take from the command line rather than from its saved config: where and how it
# runs and what it reports (prefixes of dotted keys). All else (model, data and its split, batch size,
# seed, the Trainer's training settings) changes what is trained: the run's own; max_epochs may grow.
RESUME_MAY_CHANGE = tuple(
    "ckpt_path checkpoint last_checkpoint lr_monitor divergence_guard dashboard prediction "
    "trainer.accelerator trainer.callbacks trainer.logger trainer.default_root_dir trainer.enable_progress_bar "
    "trainer.enable_model_summary trainer.log_every_n_steps trainer.num_sanity_val_steps trainer.profiler "
    "trainer.plugins data.data_dir data.download data.num_workers data.pin_memory data.predict_dir".split()
)


def find_last(config) -> str:
    """The last.ckpt written most recently by any run under the log folder (or checkpoint.dirpath)."""
    logger, root = config.trainer.logger, config.trainer.default_root_dir or "."
    init = getattr(logger, "init_args", None)
    if config.checkpoint.dirpath:  # the user placed checkpoints themselves
        pattern = glob.escape(os.path.join(config.checkpoint.dirpath, "last.ckpt"))
    elif init is not None and {"save_dir", "name", "version"} <= set(vars(init)):  # TensorBoard, CSV
        runs = os.path.join(root if init.save_dir == "." else init.save_dir, init.name or "")
        pattern = os.path.join(glob.escape(os.path.normpath(runs)), "*", "checkpoints", "last.ckpt")
    elif logger is False:  # no logger: Lightning writes to default_root_dir/checkpoints
        pattern = glob.escape(os.path.join(root, "checkpoints", "last.ckpt"))
    else:
        raise UserError("--ckpt_path last cannot find the runs of this logger: give the checkpoint's path.")
    found = glob.glob(pattern)
    if not found:
        raise UserError(
            f"nothing to resume: no {pattern}. Start a new run (without --ckpt_path last), "
            f"or run from the folder (or with the --trainer.default_root_dir) of the run to continue."
        )
    last = Path(max(found, key=os.path.getmtime))
    print(f"resuming from {last}", file=sys.stderr)
    return str(last)


def continue_run(config, last_ckpt: str, global_step: int) -> bool:
    """Have the logger write into the run's own folder, its version (not a new run); False when the
    user placed the checkpoints (the logs then go to a new version as usual)."""
    init, last = getattr(config.trainer.logger, "init_args", None), Path(last_ckpt)
    if init is None or config.checkpoint.dirpath or last.parent.name != "checkpoints":
        return False
    run = last.parent.parent.name  # version_3 -> 3; a named version stays a name
    num = run.removeprefix("version_")
    init.version = int(num) if run.startswith("version_") and num.isdigit() else run
    if "purge_step" in vars(init) and init.purge_step is None:
        # TensorBoard hides what the killed run logged after the checkpoint: the resumed run logs again
        # from step global_step on (the learning rate of the next batch first; the loss of the
        # checkpoint's own step was logged at global_step - 1)
        init.purge_step = int(global_step)
    return True


def saved_config(ckpt_path: str, ckpt: dict, known: dict) -> dict | None:
    """The settings the run was trained with: its config.yaml (SaveConfigCallback's), else the model's
    and the data's hyperparameters in the checkpoint; only the keys in `known` (flat, this CLI's)."""
    folder = Path(ckpt_path).parent
    if folder.name == "checkpoints" and (folder.parent / "config.yaml").is_file():
        saved = yaml.safe_load((folder.parent / "config.yaml").read_text()) or {}
    else:
        sections = {"model": "hyper_parameters", "data": "datamodule_hyper_parameters"}
        saved = {section: ckpt.get(key) or {} for section, key in sections.items()}
    saved = {k: v for k, v in saved.items() if k in known or any(n.startswith(k + ".") for n in known)}
    for section in ("model", "data"):  # link targets (num_classes, class_names) and old settings out
        if isinstance(saved.get(section), dict):
            saved[section] = {k: v for k, v in saved[section].items() if f"{section}.{k}" in known}
    saved.pop("ckpt_path", None)
    return saved if any(saved.values()) else None


def refuse_changes(was: dict, now: dict, ckpt_path: str) -> None:
    """UserError naming each setting in `now` that changes what the run `was` trains (all but
    RESUME_MAY_CHANGE); more epochs are allowed. Both flat."""
    may_change = tuple(f"{p}." for p in RESUME_MAY_CHANGE)
    changed = [k for k in was if k in now and now[k] != was[k] and not f"{k}.".startswith(may_change)]
    epochs = "trainer.max_epochs"
    if epochs in changed and _more_epochs(was[epochs], now[epochs]):
        changed.remove(epochs)
        print(f"training extended: max_epochs {was[epochs]} -> {now[epochs]}", file=sys.stderr)
    if changed:
        raise UserError(
            f"{ckpt_path} continues a run trained with other settings than given now; a resumed run keeps "
            f"its own (drop these, or start a new run to change them):\n"
            + "\n".join(f"  --{key}: {was[key]!r} in the run, {now[key]!r} given" for key in changed)
        )


def _more_epochs(was, now) -> bool:
    """Whether max_epochs `now` trains longer than `was` (-1: no limit)."""
    return was is not None and was != -1 and (now == -1 or (now is not None and now > was))


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other values stay whole."""
    out = {}
    for key, value in tree.items():
        out.update(
            flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key: value}
        )
    return out


def claim_run_folders(trainer, fitting: bool, resumed: str | None) -> None:
    """Refuse to write into another run's folders (`resumed`: the checkpoint a fit continues, in its
    own folders); have a failed start leave no folder behind."""
    if trainer.log_dir is None:  # fast_dev_run: no logs, no checkpoints
        return
    log_dir = Path(trainer.log_dir)
    folders = {log_dir: "--trainer.default_root_dir"}
    resumed = Path(resumed).parent.resolve() if resumed and fitting else None
    for cb in trainer.checkpoint_callbacks if fitting else []:
        folder = Path(cb.dirpath) if cb.dirpath else log_dir / "checkpoints"
        folders[folder] = "--checkpoint.dirpath" if cb.dirpath else folders[log_dir]
        held = [p.name for p in folder.glob("*.ckpt")]
        if held and folder.resolve() != resumed:
            raise UserError(
                f"{folder} holds another run's checkpoints ({', '.join(held)}): this run would overwrite them. "
                f"Continue that run with --ckpt_path last, or give this one its own {folders[folder]}."
            )
    earlier = [
        p.name for p in (log_dir / "config.yaml", *log_dir.glob("events.out.tfevents.*")) if p.exists()
    ]
    if earlier and not (resumed and resumed.is_relative_to(log_dir.resolve())):  # not its own run
        raise UserError(
            f"{log_dir} holds another run's logs ({', '.join(earlier[:3])}): this run would mix its logs "
            f"in. Give it another folder (the logger's version, or --trainer.default_root_dir)."
        )
    for folder, setting in folders.items():
        check_writable(folder, setting)
    # the top-most folder that writing each folder creates: what a failed start removes again
    created = {[p for p in (f, *f.parents) if not p.exists()][-1] for f in folders if not f.exists()}

    def undo() -> None:  # only what this run created, only when it did no work worth keeping
        for top in created if trainer.global_step == 0 else ():
            if top.is_dir() and not any(top.rglob("*.ckpt")):
                shutil.rmtree(top, ignore_errors=True)

    on_failure(undo)
