"""`geobp infer`: --labels takes one value, --normalize_on reaches inference, label options come from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from geobp.cli import main
from geobp.cli.infer import build_parser
from geobp.task import SegmentationTask
from tests.conftest import write_tif

PRE = {"bands": [1, 2, 3], "nodata": 0, "method": "meanstd", "mean": [300.0] * 3, "std": [100.0] * 3, "low": [], "high": []}
NAMES = ["water", "forest", "urban"]
#: raw label codes of the classes (NLCD-style), as a training config's data.label_map gives them
CODES = {11: 0, 41: 1, 21: 2}


def save_checkpoint(path: Path, label_options: dict | None) -> Path:
    """A checkpoint as `geobp fit` writes it (weights and hyper-parameters), with ``label_options`` when given."""
    torch.manual_seed(0)
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, class_names=NAMES, preprocessing=PRE, tile_size=32)
    hparams = dict(task.hparams)
    hparams.pop("label_options", None)
    if label_options is not None:
        hparams["label_options"] = label_options
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": hparams}, path)
    return path


@pytest.fixture
def scene(tmp_path, make_scene) -> tuple[Path, Path]:
    """An image and its ground truth in raw codes (11, 41, 21) on the image's grid."""
    img, mask = make_scene("a", size=(32, 32))
    with rasterio.open(mask) as src:
        classes = src.read(1)
        transform = src.transform
    raw = np.array(list(CODES), np.uint8)[classes]
    return img, write_tif(tmp_path / "truth.tif", raw, transform=transform)


def test_labels_takes_one_value_so_the_input_after_it_stays_an_input(capsys):
    p = build_parser()
    a = p.parse_args(["--ckpt", "c.ckpt", "--out", "d", "--labels", "truth.tif", "scene.tif"])
    assert (a.labels, a.inputs) == ("truth.tif", ["scene.tif"])
    a = p.parse_args(["scene.tif", "other.tif", "--ckpt", "c.ckpt", "--out", "d", "--labels", "truth.tif"])
    assert (a.labels, a.inputs) == ("truth.tif", ["scene.tif", "other.tif"])
    a = p.parse_args(["--labels", "[a.tif, 'b c.tif']", "scene.tif", "--ckpt", "c.ckpt", "--out", "d"])
    assert (a.labels, a.inputs) == (["a.tif", "b c.tif"], ["scene.tif"])  # a list, as data.labels takes it
    assert p.parse_args(["s.tif", "--ckpt", "c", "--out", "d", "--labels", "truth/*.tif"]).labels == "truth/*.tif"
    with pytest.raises(SystemExit) as stop:
        p.parse_args(["s.tif", "--ckpt", "c", "--out", "d", "--labels", "[1, 2]"])
    assert stop.value.code == 2
    assert "expected a file, folder, glob or a list like '[a.tif, b.tif]', found '[1, 2]'" in capsys.readouterr().err


def test_normalize_on_is_reader_or_device(capsys):
    p = build_parser()
    base = ["s.tif", "--ckpt", "c", "--out", "d"]
    assert p.parse_args(base).normalize_on is None  # inference decides by device
    assert p.parse_args([*base, "--normalize_on", "reader"]).normalize_on == "reader"
    assert p.parse_args([*base, "--normalize-on", "device"]).normalize_on == "device"
    with pytest.raises(SystemExit) as stop:
        p.parse_args([*base, "--normalize_on", "gpu"])
    assert stop.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err


def test_normalize_on_is_handed_to_predict_many(tmp_path, monkeypatch):
    import geobp.inference

    seen: dict = {}

    class Stop(Exception):
        pass

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(geobp.inference, "predict_many", record)
    with pytest.raises(Stop):
        main(["infer", "s.tif", "--ckpt", "c.ckpt", "--out", str(tmp_path), "--device", "cpu", "--normalize_on", "reader"])
    assert seen["normalize_on"] == "reader"


def test_a_cpu_run_with_normalize_on_reader_predicts(tmp_path, scene, monkeypatch):
    from geobp.inference.predict import PredictOptions

    made: list[PredictOptions] = []
    post_init = PredictOptions.__post_init__

    def spy(self):
        post_init(self)
        made.append(self)

    monkeypatch.setattr(PredictOptions, "__post_init__", spy)
    img, _ = scene
    ckpt = save_checkpoint(tmp_path / "m.ckpt", None)
    assert main(["infer", str(img), "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--normalize_on", "reader"]) == 0
    assert (tmp_path / "out" / "a_classes.tif").is_file()
    # the options the run used (the last made: the defaults come first, then --normalize_on and the model's tile size)
    assert made and made[-1].normalize_on == "reader"


def test_labels_before_the_input_are_scored_with_the_checkpoints_label_options(tmp_path, scene, capsys):
    img, truth = scene
    ckpt = save_checkpoint(tmp_path / "m.ckpt", {"label_map": CODES, "label_field": None, "label_background": None,
                                                  "all_touched": False})
    out = tmp_path / "out"
    assert main(["infer", "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", "--labels", str(truth), str(img)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"label options from the checkpoint {ckpt}: label_map {{11: 0, 41: 1, 21: 2}}, label_field None" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert not metrics["failed"] and metrics["total"]["pixels"] == 32 * 32  # every code mapped
    # options on the command line win over the checkpoint's: 41 and 21 are now unmapped, nothing is scored
    code = main(["infer", str(img), "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", "--overwrite",
                 "--labels", str(truth), "--label_map", "{11: 0}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "label options from the command line: label_map {11: 0}" in " ".join(err.split())
    not_scored = [line for line in err.splitlines() if line.startswith("NOT SCORED")]
    assert len(not_scored) == 1 and "truth.tif: label values [21, 41] are neither in data.label_map" in not_scored[0]


def test_a_checkpoint_without_label_options_says_so_and_unscorable_labels_exit_1(tmp_path, scene, capsys):
    img, truth = scene
    ckpt = save_checkpoint(tmp_path / "old.ckpt", None)
    code = main(["infer", str(img), "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--labels", str(truth)])
    assert code == 1  # the class maps were written, but nothing could be scored
    err = capsys.readouterr().err
    assert f"label options from the defaults (the checkpoint {ckpt} holds none)" in " ".join(err.split())
    first = next(line for line in err.splitlines() if line.startswith("NOT SCORED"))
    assert "truth.tif: label values" in first and "Fix:" in " ".join(err.split())
    assert (tmp_path / "out" / "a_classes.tif").is_file()


def test_nothing_predicted_means_nothing_scored_and_exit_1(tmp_path, scene, capsys):
    _, truth = scene
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    ckpt = save_checkpoint(tmp_path / "m.ckpt", None)
    assert main(["infer", str(bad), "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--labels", str(truth)]) == 1
    assert "NOT SCORED: no class map was written (every input failed)" in capsys.readouterr().err


def test_fit_links_the_data_label_options_into_the_model(tmp_path):
    """model.label_options is linked from the data module's LabelOptions, so every checkpoint holds them."""
    from geobp.cli.train import build_cli
    from geobp.data.synth import write_scenes

    write_scenes(tmp_path / "s", scenes=2, size=32, bands=3, classes=3, block_size=16)
    cli = build_cli(["--data.root", str(tmp_path / "s"), "--data.num_classes", "3", "--data.tile_size", "16",
                     "--data.label_map", "{7: 1, -1: 255}", "--data.all_touched", "true",
                     "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "runs")], run=False)
    assert cli.model.hparams["label_options"] == {"label_map": {7: 1, -1: 255}, "label_field": None,
                                                  "label_background": None, "all_touched": True}


def test_infer_scores_with_the_label_options_fit_trained_with(tmp_path, capsys):
    """fit on raw codes with data.label_map, then `geobp infer --labels` with no --label_* option: scored as trained."""
    import yaml

    from geobp.data.synth import write_scenes

    write_scenes(tmp_path / "s", scenes=3, size=64, bands=3, classes=3, block_size=32)
    codes = np.arange(256, dtype=np.uint8)  # the ignore index (the scenes' nodata borders) stays 255
    codes[:3] = list(CODES)
    for mask in sorted((tmp_path / "s" / "masks").glob("*.tif")):
        with rasterio.open(mask) as src:
            raw = codes[src.read(1)]
            write_tif(tmp_path / "truth" / mask.name, raw, transform=src.transform, crs=src.crs.to_string())
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_val_batches": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": False, "default_root_dir": str(tmp_path / "runs")},
        "model": {"encoder": "resnet18", "model_kwargs": {"decoder_channels": [32, 16, 16, 8, 8]}},
        "data": {"root": str(tmp_path / "s"), "images": str(tmp_path / "s" / "images"), "labels": str(tmp_path / "truth"),
                 "label_map": CODES, "num_classes": 3, "tile_size": 32, "tiles_per_epoch": 4, "batch_size": 4,
                 "val_fraction": 0.34},
    }))
    assert main(["fit", "--config", str(cfg)]) == 0
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    capsys.readouterr()
    img = tmp_path / "s" / "images" / "scene_000.tif"
    assert main(["infer", "--ckpt", str(last), "--out", str(tmp_path / "pred"), "--device", "cpu",
                 "--labels", str(tmp_path / "truth"), str(img)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"label options from the checkpoint {last}: label_map {{11: 0, 21: 2, 41: 1}}" in err  # (the config's order)
    assert json.loads((tmp_path / "pred" / "metrics.json").read_text())["total"]["pixels"] > 0
