"""The first hour of a new user, end to end: a small Landsat 7 scene and a sparse training raster.

The case of issue #23, generated here: an 8-band int16 scene with nodata -9999 (250 x 250 px, 30 m,
UTM) and a sparse training raster named ``training_data.gtif`` (uint8, classes 1..5, 0 where no one
labelled). The label options are given once, to ``geobp fit``: ``geobp infer --labels`` takes them
from the checkpoint, and ``--labels`` may come before the input raster.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import from_origin

from geobp.cli import main

SIZE = 250
NODATA = -9999
LABEL_MAP = {0: 255, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
NAMES = ["water", "forest", "crops", "urban", "bare"]


def write_landsat(folder: Path) -> tuple[Path, Path]:
    """An 8-band int16 scene with land-cover blobs and a nodata corner, and its sparse training raster."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cover = ((yy // 50) * 3 + (xx // 60)) % 5  # five classes in blocks
    spectra = rng.integers(500, 4000, size=(5, 8))
    image = spectra[cover].transpose(2, 0, 1) + rng.normal(0, 60, size=(8, SIZE, SIZE))
    image = image.astype(np.int16)
    valid = ~((yy + xx) < 40)  # a triangle without data, as at a scene's edge
    image[:, ~valid] = NODATA
    transform = from_origin(300000.0, 4300000.0, 30.0, 30.0)
    scene = folder / "LE07_subset.tif"
    profile = dict(driver="GTiff", width=SIZE, height=SIZE, count=8, dtype="int16", crs="EPSG:32617",
                   transform=transform, nodata=NODATA)
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(image)
    # 0: unlabelled; a few labelled polygons' worth of pixels per class, as a user digitises them
    training = np.zeros((SIZE, SIZE), np.uint8)
    keep = rng.random((SIZE, SIZE)) < 0.08
    training[keep & valid] = cover[keep & valid] + 1
    labels = folder / "training_data.gtif"
    with rasterio.open(labels, "w", driver="GTiff", width=SIZE, height=SIZE, count=1, dtype="uint8",
                       crs="EPSG:32617", transform=transform) as dst:
        dst.write(training, 1)
    return scene, labels


@pytest.mark.slow
def test_landsat_scene_trains_predicts_and_scores_with_label_options_given_once(tmp_path, capsys):
    scene, labels = write_landsat(tmp_path)
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "limit_val_batches": 2, "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "landsat"}},
        },
        "model": {"encoder": "resnet18", "model_kwargs": {"decoder_channels": [32, 16, 16, 8, 8]}},
        "data": {
            "images": [str(scene)], "labels": str(labels), "label_map": LABEL_MAP,
            "num_classes": 5, "class_names": NAMES, "tile_size": 32, "tiles_per_epoch": 16, "batch_size": 8,
            "split": "blocks", "split_block_size": 64, "val_fraction": 0.25,
        },
    }
    config = tmp_path / "landsat.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(config)]) == 0
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    capsys.readouterr()

    # --labels first, the input last: both are one value each; no label options repeated
    out = tmp_path / "pred"
    assert main(["infer", "--ckpt", str(ckpt), "--out", str(out), "--labels", str(labels), str(scene)]) == 0
    err = capsys.readouterr().err
    assert "label options" in err and "checkpoint" in err
    metrics = json.loads((out / "metrics.json").read_text())
    with rasterio.open(labels) as src:
        training = src.read(1)
    with rasterio.open(scene) as src:
        valid = src.read(1) != NODATA
    # every labelled pixel counts once (0 was mapped to the ignore index by the checkpoint's label_map)
    assert np.asarray(metrics["total"]["confusion"]).sum() == int(((training > 0) & valid).sum())
    assert list(metrics["total"]["per_class"]) == NAMES
