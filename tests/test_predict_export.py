"""Using a trained model: reading people's images, predicting to a CSV, exporting, per-class test accuracy."""

import csv
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import CLASSES, load_script, quiet_trainer, run_script, write_image_folder
from PIL import Image

from lit_cifar import CIFARClassifier, CIFARDataModule, UserError
from lit_cifar.checkpoints import load_model, read_checkpoint
from lit_cifar.cli import main as cli_main
from lit_cifar.images import read_image
from lit_cifar.prediction import CSV_COLUMNS, SKIPPED_EXIT


def train_tiny(root: Path, normalize: bool = True) -> Path:
    """One epoch on a tiny 3-class image folder; returns the checkpoint (with the data's hparams)."""
    data_dir = write_image_folder(root / "images", per_class=8, test_per_class=4)
    L.seed_everything(0)
    data = CIFARDataModule(str(data_dir), batch_size=16, val_size=3, normalize=normalize)
    model = CIFARClassifier("seed", num_classes=3, class_names=CLASSES)
    trainer = quiet_trainer(max_epochs=1, default_root_dir=root)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(root / "tiny.ckpt")
    return root / "tiny.ckpt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("trained"))


def write_people_images(folder: Path) -> list[Path]:
    """Mixed sizes and modes, one corrupt file, one non-image file; returns the readable images, in order."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    images = [folder / "a_rgb.jpg", folder / "b_gray.png", folder / "sub" / "c_rgba.png"]
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(images[0])  # 50x40
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(images[1])
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(images[2])
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image, not looked at")
    return images


def expected_probs(ckpt: Path, paths: list[Path]) -> torch.Tensor:
    """What the checkpoint says, computed by hand: read, prepare as in training, predict_step."""
    model, settings = load_model(ckpt)
    x = CIFARDataModule(**settings).to_float(torch.stack([read_image(p) for p in paths]))
    with torch.no_grad():
        return model.predict_step(x, 0)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        return list(reader)


def check_rows(rows: list[dict], paths: list[Path], probs: torch.Tensor) -> None:
    assert [row["path"] for row in rows] == [str(p) for p in paths]
    for row, p in zip(rows, probs, strict=True):
        top = p.sort(descending=True)
        assert [row["class"], row["class_2"], row["class_3"]] == [CLASSES[i] for i in top.indices]
        got = [float(row[k]) for k in ("probability", "probability_2", "probability_3")]
        assert got == pytest.approx(top.values.tolist(), abs=1e-5)
        assert sum(got) == pytest.approx(1, abs=1e-4)  # 3 classes: the top 3 are all of them


# ---------------------------------------------------------------------------- images


def test_read_image_makes_any_image_cifar_shaped(tmp_path):
    paths = write_people_images(tmp_path / "people")
    for path in paths:
        x = read_image(path)
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    gray = read_image(paths[1])
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # grayscale -> equal RGB
    exact = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8)
    Image.fromarray(exact.numpy()).save(tmp_path / "exact.png")
    assert torch.equal(read_image(tmp_path / "exact.png"), exact.permute(2, 0, 1))  # 32x32: untouched
    with pytest.raises(Exception):  # noqa: B017 - whatever PIL raises; ImageFiles turns it into a skip
        read_image(tmp_path / "people" / "broken.png")


# ---------------------------------------------------------------------------- predict


def test_predict_script_writes_csv_and_skips_unreadable(ckpt, tmp_path, capsys):
    paths = write_people_images(tmp_path / "people")
    extra = tmp_path / "extra.png"  # a file named directly, after the folder's
    Image.fromarray(np.full((100, 80, 3), 200, dtype=np.uint8)).save(extra)
    args = [str(ckpt), str(tmp_path / "people"), str(extra), "--output", "out/p.csv", "--batch-size", "2"]
    with pytest.raises(SystemExit) as exit_info:
        run_script("predict", *args)
    assert exit_info.value.code == SKIPPED_EXIT == 3
    out, err = capsys.readouterr()
    assert "broken.png" in err and "skipped 1 unreadable" in err and "notes.txt" not in err
    assert "4 image(s) predicted -> out/p.csv" in out
    check_rows(read_csv(Path("out/p.csv")), [*paths, extra], expected_probs(ckpt, [*paths, extra]))

    # Everything readable: exit status 0, predictions.csv in the working folder.
    run_script("predict", str(ckpt), str(extra))
    check_rows(read_csv(Path("predictions.csv")), [extra], expected_probs(ckpt, [extra]))


def test_cli_predict(ckpt, tmp_path, capsys):
    paths = write_people_images(tmp_path / "people")
    args = ["predict", f"--ckpt_path={ckpt}", f"--data.predict_dir={tmp_path / 'people'}"]
    args += ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == SKIPPED_EXIT
    check_rows(read_csv(Path("predictions.csv")), paths, expected_probs(ckpt, paths))
    assert "broken.png" in capsys.readouterr().err

    (tmp_path / "people" / "broken.png").unlink()
    cli_main([*args, "--prediction.output=clean.csv"])  # nothing skipped: returns normally (status 0)
    check_rows(read_csv(Path("clean.csv")), paths, expected_probs(ckpt, paths))


def test_predict_prepares_images_as_the_model_was_trained(tmp_path):
    """A model trained on [0, 1] pixels (normalize=false, the seed recipe) is fed [0, 1] pixels."""
    ckpt = train_tiny(tmp_path / "raw", normalize=False)
    assert load_model(ckpt)[1] == {"dataset": "cifar10", "normalize": False}
    image = tmp_path / "one.png"
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(image)
    cli_main(["predict", f"--ckpt_path={ckpt}", f"--data.predict_dir={image}"])
    model = load_model(ckpt)[0]
    with torch.no_grad():
        raw = model.predict_step(read_image(image)[None].float() / 255, 0)[0]
    assert float(read_csv(Path("predictions.csv"))[0]["probability"]) == pytest.approx(
        raw.max().item(), abs=1e-5
    )


def test_bad_checkpoints_get_clear_errors(tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.ckpt")
    torch.save({"x": print}, tmp_path / "unsafe.ckpt")  # loading would need an arbitrary global
    cases = {
        tmp_path / "missing.ckpt": "no checkpoint at",
        image: "is not a PyTorch checkpoint, or it is truncated",
        tmp_path / "other.ckpt": "not a Lightning checkpoint",
        tmp_path / "unsafe.ckpt": "that would run code when loaded",
    }
    for path, message in cases.items():
        with pytest.raises(UserError, match=message):
            read_checkpoint(path)
    with pytest.raises(SystemExit, match="error: .*not a Lightning checkpoint"):
        run_script("predict", str(tmp_path / "other.ckpt"), str(image))


# ---------------------------------------------------------------------------- export


def exported_diff(out: str) -> float:
    return float(
        re.search(r"max abs difference of probabilities, .*: ([0-9.e+-]+) \(tolerance", out).group(1)
    )


@pytest.mark.slow  # ONNX export traces the model (several seconds)
def test_export_onnx_and_torchscript_agree_with_the_checkpoint(ckpt, tmp_path, capsys):
    import onnxruntime

    paths = write_people_images(tmp_path / "people")
    run_script("export", str(ckpt), "--format", "onnx")
    assert exported_diff(capsys.readouterr().out) <= 1e-4
    run_script("export", str(ckpt), "--format", "torchscript", "--check-images", str(tmp_path / "people"))
    out = capsys.readouterr().out
    assert "on 3 images" in out and exported_diff(out) <= 1e-4
    assert sorted(p.name for p in ckpt.parent.iterdir() if p.is_file()) == [  # no temporary left
        "tiny.ckpt",
        "tiny.onnx",
        "tiny.pt",
    ]

    # Raw uint8 images in, probabilities out, any batch size: the deployment contract.
    images = torch.stack([read_image(p) for p in paths])  # (3, 3, 32, 32) uint8
    expected = expected_probs(ckpt, paths)
    session = onnxruntime.InferenceSession(str(ckpt.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    onnx_probs = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    assert (onnx_probs - expected).abs().max() <= 1e-4
    scripted = torch.jit.load(str(ckpt.with_suffix(".pt")))
    assert scripted.class_names == CLASSES
    assert (scripted(images) - expected).abs().max() <= 1e-4


def test_export_that_disagrees_writes_nothing(ckpt, tmp_path, monkeypatch):
    export = load_script("export")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no difference can pass: the check must fail
    target = tmp_path / "model.pt"
    with pytest.raises(SystemExit, match="disagrees with the checkpoint"):
        export.main(
            export.get_args_parser().parse_args(
                [str(ckpt), "--format", "torchscript", "--output", str(target)]
            )
        )
    assert list(tmp_path.glob("*model*")) == []  # neither the file nor its temporary


# ---------------------------------------------------------------------------- evaluate


def test_test_reports_accuracy_per_class(ckpt):
    model = load_model(ckpt)[0]
    data = CIFARDataModule(str(ckpt.parent / "images"), batch_size=5)  # batches that straddle classes
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    results = trainer.test(model, datamodule=data)[0]
    per_class = [results[f"test/acc_{name}"] for name in CLASSES]
    assert results["test/acc"] == pytest.approx(sum(per_class) / 3)  # 4 test images per class


def test_cli_predict_reads_the_checkpoint_once(ckpt, tmp_path, monkeypatch):
    image = tmp_path / "one.png"
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(image)
    loads, torch_load = [], torch.load
    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", lambda f, *a, **k: loads.append(f) or torch_load(f, *a, **k))
        cli_main(["predict", f"--ckpt_path={ckpt}", f"--data.predict_dir={image}"])
    assert loads == [ckpt]  # one read, by lit-cifar's own weights-only reader; none by Lightning
    check_rows(read_csv(Path("predictions.csv")), [image], expected_probs(ckpt, [image]))
