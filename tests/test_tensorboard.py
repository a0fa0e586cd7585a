"""The TensorBoard dashboard: what the callback writes, the tour script, and a real TensorBoard server."""

import json
import math
import re
import runpy
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, checksum_config, events, quiet_trainer, run
from lightning.pytorch.loggers import TensorBoardLogger

from lit_cifar import CIFARClassifier, CIFARDataModule, build_net
from lit_cifar.dashboard import HPARAMS_METRICS, TensorBoardDashboard, _for_display
from lit_cifar.figures import channel_grid, layer_outputs

FEATURE_MAPS = [f"val/feature_maps/{n}" for n in ("0_conv2d", "1_maxpool2d", "2_conv2d", "3_maxpool2d")]
FEATURE_MAPS += ["val/feature_maps/4_conv2d", "val/feature_maps/5_maxpool2d"]
PICTURES = {
    "val/inputs",
    "val/confusion_matrix",
    "test/confusion_matrix",
    "test/misclassified",
    *FEATURE_MAPS,
}


def fit_and_test(tmp_path: Path, batches, dashboard: TensorBoardDashboard) -> Path:
    """2 tiny epochs and a test on the random-label pickles (so some predictions are wrong)."""
    root, md5s = batches
    data = CIFARDataModule(str(root), checksums=md5s, batch_size=8)
    model = CIFARClassifier("seed", num_classes=10, class_names=data.classes)
    logger = TensorBoardLogger(tmp_path / "logs", default_hp_metric=False, log_graph=True)
    limits = {f"limit_{stage}_batches": 2 for stage in ("train", "val", "test")}
    trainer = quiet_trainer(max_epochs=2, logger=logger, callbacks=[dashboard], **limits)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)
    return Path(logger.log_dir)


def test_dashboard_writes_every_picture_and_the_hparams(tmp_path, batches):
    found = events(fit_and_test(tmp_path, batches, TensorBoardDashboard(num_images=4, max_channels=8)))
    assert set(found["images"]) == PICTURES
    assert all(len(found["images"][t]) == 2 for t in found["images"] if t.startswith("val/"))  # per epoch
    conv = found["images"]["val/feature_maps/0_conv2d"][-1]
    assert (conv.width, conv.height) == (8 * 34 + 2, 4 * 34 + 2)  # 8 channel tiles per row, 4 image rows
    assert found["graph"]
    # HParams: declared with its metrics, whose values come from the real scalar series only
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(found["hparams"])
    experiment = found["hparams"]["_hparams_/experiment"]
    assert all(tag.encode() in experiment for tag in HPARAMS_METRICS)
    assert b"lr" in experiment and b"batch_size" in experiment  # model and data settings
    assert len(found["scalars"]["val/acc_best"]) == 2 and len(found["scalars"]["test/acc"]) == 1


def test_dashboard_switched_off_writes_no_pictures(tmp_path, batches):
    off = TensorBoardDashboard(
        inputs=False, feature_maps=False, confusion_matrix=False, misclassified=False, hparams=False
    )
    found = events(fit_and_test(tmp_path, batches, off))
    assert found["images"] == {} and found["hparams"] == {}
    assert [0 <= acc <= 1 for _, acc in found["scalars"]["val/acc"]] == [True, True]  # the metrics stay


def test_feature_maps_are_per_channel_grids():
    x = torch.rand(3, 3, 32, 32)
    maps, logits = layer_outputs(build_net("seed"), x)
    assert {k: tuple(v.shape[1:]) for k, v in maps.items()} == {
        "0_conv2d": (32, 32, 32),
        "1_maxpool2d": (32, 16, 16),
        "2_conv2d": (32, 16, 16),
        "3_maxpool2d": (32, 8, 8),
        "4_conv2d": (64, 8, 8),
        "5_maxpool2d": (64, 4, 4),
    }
    assert logits.shape == (3, 10)
    grid = channel_grid(maps["5_maxpool2d"], max_channels=5)  # 4x4 maps enlarged to 32x32 tiles
    assert grid.shape == (3, 3 * 34 + 2, 5 * 34 + 2)
    # each tile is scaled on its own: a channel of tiny values still spans black to white
    tiny = torch.tensor([[0.0, 1e-3], [2e-3, 3e-3]])
    grid = channel_grid(torch.stack([tiny, tiny * 1e6])[None], size=2)  # (1, 2, 2, 2): two channels
    for tile in (grid[0, 2:4, 2:4], grid[0, 2:4, 6:8]):
        assert tile.min() == 0 and tile.max() == 1


@pytest.mark.parametrize("flip_tta", [True, False])
def test_confusion_matrix_agrees_with_the_logged_accuracy(tmp_path, batches, flip_tta):
    torch.manual_seed(0)
    root, md5s = batches  # random images and labels: an image and its mirror are told apart at random
    data = CIFARDataModule(str(root), checksums=md5s, val_size=30, batch_size=8)
    model = CIFARClassifier("seed", num_classes=10, flip_tta=flip_tta)
    dashboard = TensorBoardDashboard(inputs=False, feature_maps=False, misclassified=False, hparams=False)
    # an untrained net: its predictions vary (a trained one here says one class)
    trainer = quiet_trainer(
        logger=TensorBoardLogger(tmp_path, default_hp_metric=False), callbacks=[dashboard]
    )
    logged = {
        "val": trainer.validate(model, datamodule=data)[0]["val/acc"],
        "test": trainer.test(model, datamodule=data)[0]["test/acc"],
    }
    for stage, acc in logged.items():
        matrix = dashboard.matrices[stage]
        assert (matrix.trace() / matrix.sum()).item() == pytest.approx(acc)

    # They are the evaluated predictions (with flip_tta the mean of an image's and its mirror's logits),
    # which here differ from the predictions of the mirror images alone, all a forward hook saw.
    def confusion(preds: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.bincount(y * 10 + preds, minlength=100).view(10, 10)

    x, y = data.data["val"]
    with torch.no_grad():
        x = data.to_float(x)
        evaluated, mirrored = model.evaluate(x).argmax(1), model(x.flip(3)).argmax(1)
    assert torch.equal(dashboard.matrices["val"], confusion(evaluated, y))
    if flip_tta:
        assert not torch.equal(confusion(evaluated, y), confusion(mirrored, y))


def test_misclassified_pick_keeps_only_wrong_images_from_the_whole_set():
    dashboard = TensorBoardDashboard(num_misclassified=4)
    for b in range(6):  # one wrong prediction per batch, at position b
        y = torch.zeros(8, dtype=torch.long)
        pred = y.clone()
        pred[b] = 1
        dashboard._keep_wrong(torch.full((8, 3, 2, 2), float(b)), y, pred, b)
    x, y, pred, key = dashboard._wrong
    assert len(key) == 4 and (pred != y).all() and (key >= 1).all()
    assert len(set(x[:, 0, 0, 0].tolist())) == 4  # from 4 different batches


def test_images_are_shown_unnormalized():
    data = CIFARDataModule("unused", normalize=True)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    shown = _for_display(data.to_float(pixels), SimpleNamespace(datamodule=data))
    assert torch.allclose(shown, pixels / 255, atol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        TensorBoardDashboard(num_images=0)


def tour(monkeypatch, *args: str) -> None:
    """Run scripts/tour.py in this process (a fresh interpreter spends most of its time importing)."""
    monkeypatch.setattr(sys, "argv", ["tour.py", *args])
    runpy.run_path(str(REPO / "scripts/tour.py"), run_name="__main__")


@pytest.mark.parametrize("source", [None, "image_folder"])
def test_tour_runs_on_synthetic_and_folder_images(tmp_path, source, request, monkeypatch, capsys):
    args = ["--log-dir", str(tmp_path / "tour"), "--num-images", "4"]
    tour(monkeypatch, *args, *(["--data-dir", str(request.getfixturevalue(source))] if source else []))
    out, num_classes = capsys.readouterr().out, 3 if source else 10  # the test folder has 3 classes
    assert "(4, 3, 32, 32) -> (4, 6, 30, 30)" in out and f"(4, 3072) -> (4, {num_classes})" in out
    # The seed's loss examples: output [1, 2, 3], target [1, 3, 5], both (1, 1, 3); logits [[0.1, 0.8, 0.2]],
    # class 1. And the seed net's loss on the images: a finite number.
    values = dict(re.findall(r"^(.+?) +input .* = (\S+)$", out, re.MULTILINE))
    assert values["L1Loss()"] == "1.0000" and values["MSELoss()"] == "1.6667"
    assert (
        values["CrossEntropyLoss(), 3 classes"] == "0.7156"
        and "input (1, 3) target (1,) -> () = 0.7156" in out
    )
    assert math.isfinite(float(values["CrossEntropyLoss(), seed net on the images"]))
    images = events(tmp_path / "tour")["images"]
    assert {"tour/0_input", "tour/1_conv2d", "tour/2_maxpool2d", "tour/3_relu", "tour/4_tanh"} <= set(images)
    assert "tour/6_seed_net/0_conv2d" in images


def test_tour_refuses_a_missing_folder(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="is not a folder"):
        tour(monkeypatch, "--data-dir", str(tmp_path / "nope"), "--log-dir", str(tmp_path / "tour"))
    assert not (tmp_path / "tour").exists()  # nothing half-written


# ---------------------------------------------------------------------------- the real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_real_tensorboard_server_serves_the_dashboard(tmp_path, batches):
    root, md5s = batches
    config = tmp_path / "tiny.yaml"  # 2 tiny epochs that log every step (fast_dev_run logs nothing)
    config.write_text("trainer:\n  limit_train_batches: 3\n  limit_val_batches: 2\n  log_every_n_steps: 1\n")
    logs = tmp_path / "runs"
    train = [sys.executable, str(REPO / "scripts/train.py"), "--accelerator", "cpu", checksum_config(md5s)]
    run(*train, "--config", str(config), "--data-dir", str(root), "--batch-size", "8", "--max-epochs", "2",
        "--default-root-dir", str(logs))  # fmt: skip

    port = free_port()
    url = f"http://127.0.0.1:{port}/data"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logs), "--host", "127.0.0.1"]
        + ["--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, scalars = time.monotonic() + 90, {}
        while not scalars:  # wait for the server to answer, then to have read the logs
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "tensorboard did not serve the run within 90 s"
            time.sleep(0.5)
            try:
                scalars = ask(f"{url}/plugin/scalars/tags")
            except OSError:  # not listening yet
                pass
        (version,) = scalars  # lightning_logs/version_0
        plugins = ask(f"{url}/plugins_listing")
        assert {"scalars", "images", "hparams", "graphs"} <= {p for p, v in plugins.items() if v["enabled"]}

        expected = {"train/loss_step", "train/loss_epoch", "val/loss", "val/acc", "val/acc_best", "test/acc"}
        assert expected | {"lr-AdamW"} <= set(scalars[version])
        assert PICTURES <= set(ask(f"{url}/plugin/images/tags")[version])
        assert ask(f"{url}/plugin/graphs/info")[version]["run_graph"]

        groups = ask(
            f"{url}/plugin/hparams/session_groups",
            {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN"], "sliceSize": 10},
        )["sessionGroups"]
        (session,) = groups
        assert session["hparams"]["net"] == "seed" and session["hparams"]["batch_size"] == 8
        metrics = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
        assert set(metrics) == set(HPARAMS_METRICS) and all(0 <= v <= 1 for v in metrics.values())
        final = {
            t: ask(f"{url}/plugin/scalars/scalars?{urllib.parse.urlencode({'run': version, 'tag': t})}")[-1][
                2
            ]
            for t in HPARAMS_METRICS
        }  # [wall time, step, value] per point
        assert metrics == pytest.approx(final)  # the HParams values are the scalar series' last points
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
