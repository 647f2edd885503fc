"""End-to-end: the real CLI on a tiny config over tiny generated GeoTIFFs."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from geobp.cli import main
from geobp.data.synth import write_scenes
from geobp.task import SegmentationTask


def tiny_config(tmp_path: Path, root: Path, **data) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_val_batches": 2,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "t"}},
        },
        "model": {"encoder": "resnet18", "model_kwargs": {"decoder_channels": [32, 16, 16, 8, 8]}},
        "data": {"root": str(root), "num_classes": 3, "tile_size": 32, "tiles_per_epoch": 8, "batch_size": 4, "val_fraction": 0.34, **data},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def scenes(tmp_path):
    root = tmp_path / "scenes"
    write_scenes(root, scenes=3, size=64, bands=4, classes=3, block_size=32)
    return root


@pytest.mark.slow
def test_fit_end_to_end_writes_self_describing_checkpoint(tmp_path, scenes):
    assert main(["fit", "--config", str(tiny_config(tmp_path, scenes, bands=[1, 3, 4]))]) == 0
    ckpts = sorted((tmp_path / "runs").rglob("*.ckpt"))
    names = {p.name for p in ckpts}
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    task = SegmentationTask.from_checkpoint(next(p for p in ckpts if p.name == "last.ckpt"))
    # the data decided the model's bands, classes and preprocessing
    assert task.hparams["in_channels"] == 3 and task.hparams["num_classes"] == 3
    assert task.preprocessing.bands == [1, 3, 4] and len(task.preprocessing.mean) == 3
    assert task.hparams["tile_size"] == 32
    out = task(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32)
    # the gradient-flow report is on by default, and `geobp report` re-renders it
    run_dir = next((tmp_path / "runs").rglob("gradflow")).parent
    report = json.loads((run_dir / "gradflow" / "gradflow.json").read_text())
    assert "diagnoses" in report
    (run_dir / "gradflow" / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert "<html" in (run_dir / "gradflow" / "report.html").read_text().lower()


def test_validate_from_checkpoint(tmp_path, scenes, capsys):
    cfg = tiny_config(tmp_path, scenes)
    assert main(["fit", "--config", str(cfg)]) == 0
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    assert main(["validate", "--config", str(cfg), "--ckpt_path", str(last)]) == 0
    assert "val/mIoU" in capsys.readouterr().out


def test_bad_data_gives_one_line_error(tmp_path, capsys):
    cfg = tiny_config(tmp_path, tmp_path / "missing")
    assert main(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "missing/images: folder not found" in err and "Fix:" in err
    assert "Traceback" not in err


def test_synth_command(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "s"), "--scenes", "2", "--size", "32", "--bands", "3", "--classes", "2"]) == 0
    assert len(list((tmp_path / "s" / "images").glob("*.tif"))) == 2


def test_infer_command_writes_georeferenced_maps_and_reports_failures(tmp_path, scenes, capsys):
    import rasterio

    assert main(["fit", "--config", str(tiny_config(tmp_path, scenes))]) == 0
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    img = scenes / "images" / "scene_000.tif"
    code = main(["infer", "--ckpt", str(last), "--out", str(tmp_path / "pred"), str(img), str(bad)])
    assert code == 1  # one input failed, the other finished
    out = tmp_path / "pred" / "scene_000_classes.tif"
    with rasterio.open(out) as dst, rasterio.open(img) as src:
        assert dst.crs == src.crs and dst.transform == src.transform and dst.shape == src.shape
        assert dst.dtypes[0] == "uint8"
    err = capsys.readouterr().err
    assert "bad.tif: not a readable raster" in err and "1 raster(s) predicted, 1 failed" in err


def test_infer_refuses_another_dtype_than_training(tmp_path, scenes, capsys):
    assert main(["fit", "--config", str(tiny_config(tmp_path, scenes))]) == 0
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    other = tmp_path / "other"
    write_scenes(other, scenes=1, size=64, bands=4, classes=3, block_size=32, dtype="float32")
    code = main(["infer", "--ckpt", str(last), "--out", str(tmp_path / "pred"), str(other / "images")])
    assert code == 1
    assert "raster data type differs from training (expected uint16, found float32)" in capsys.readouterr().err


def test_library_internal_deprecations_are_silenced_and_others_are_not():
    import warnings

    from geobp.cli import quiet_library_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`", FutureWarning)
        warnings.warn("something a user should see", UserWarning)
    assert [str(w.message) for w in caught] == ["something a user should see"]
