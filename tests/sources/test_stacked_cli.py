"""Imagery as published, end to end through the CLI: ``geobp fit`` on a STAC collection and on three
sources (S2 per-band COGs, S1 in another CRS, a DEM mosaic), ``geobp check`` on them, and
``geobp infer`` on a STAC item and on ``--images`` with the same mapping; the class map equals that
of a stacked local copy of the same bands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from geobp.cli import main
from geobp.raster import open_raster
from geobp.sources.imagery import resolve_images
from tests.sources.conftest import EPSG, NORTH, WEST, StacTree
from tests.sources.test_imagery import dem_tiles, s1
from tests.conftest import write_tif

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stacked_cli")]

BANDS = ["s2:blue", "s2:red", "s2:nir", "s1:VV", "dem:1"]


def config(tmp_path: Path, name: str, images, bands, labels: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_val_batches": 2, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": name}}},
        "model": {"encoder": "resnet18", "model_kwargs": {"decoder_channels": [16, 16, 8, 8, 8]}},
        "data": {"images": images, "labels": str(labels), "bands": bands, "num_classes": 3, "tile_size": 32,
                 "tiles_per_epoch": 16, "batch_size": 8, "split": "blocks", "split_block_size": 64, "val_fraction": 0.25,
                 "cache_dir": str(tmp_path / "cache")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # the first source is the reference: order matters
    return path


@pytest.fixture(scope="module")
def runs(stac_tree: StacTree, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stacked_cli")
    labels = np.zeros((120, 120), np.uint8)
    labels[:, 60:] = 1
    labels[60:, :30] = 2
    from rasterio.transform import from_origin

    label_path = write_tif(root / "labels.tif", labels, crs=f"EPSG:{EPSG}", transform=from_origin(WEST, NORTH, 10, 10))
    s1_path = s1(root)
    dem_tiles(root)
    sources = {"s2": str(stac_tree.root / stac_tree.item), "s1": {"images": str(s1_path), "resampling": "bilinear"},
               "dem": str(root / "dem")}
    multi = config(root, "multi", sources, BANDS, label_path)
    assert main(["fit", "--config", str(multi)]) == 0
    stac = config(root, "stac", str(stac_tree.root / stac_tree.collection), ["blue", "red", "swir16"], label_path)
    assert main(["fit", "--config", str(stac)]) == 0
    return {"root": root, "sources": sources, "multi": multi, "labels": label_path,
            "multi_ckpt": next((root / "runs" / "multi").rglob("last.ckpt")),
            "stac_ckpt": next((root / "runs" / "stac").rglob("last.ckpt"))}


def test_multi_source_model_predicts_from_the_mapping_as_from_a_stacked_copy(runs, stac_tree, capsys):
    root = runs["root"]
    out = root / "pred_mapping"
    assert main(["infer", "--ckpt", str(runs["multi_ckpt"]), "--out", str(out), "--images", json.dumps(runs["sources"])]) == 0
    classes = out / f"{stac_tree.ids[0]}_classes.tif"
    with rasterio.open(classes) as src:  # on the reference (S2 10 m) grid
        assert (src.width, src.height, src.crs.to_epsg()) == (120, 120, EPSG)
        assert src.transform.c == WEST and src.transform.f == NORTH and src.transform.a == 10
        from_mapping = src.read(1)
    # a stacked local copy of the same bands, as a user would have written with gdalwarp + gdal_merge
    (path,) = resolve_images(runs["sources"], BANDS)
    with open_raster(path) as stack:
        data, names = stack.read(), stack.descriptions
        profile = dict(driver="GTiff", width=120, height=120, count=len(names), dtype="float32", crs=stack.crs,
                       transform=stack.transform, nodata=math.nan, tiled=True, blockxsize=32, blockysize=32)
    copy = root / "copy" / f"{stac_tree.ids[0]}.tif"
    copy.parent.mkdir()
    with rasterio.open(copy, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = names
    out_copy = root / "pred_copy"
    assert main(["infer", "--ckpt", str(runs["multi_ckpt"]), "--out", str(out_copy), str(copy)]) == 0
    with rasterio.open(out_copy / copy.name.replace(".tif", "_classes.tif")) as src:
        np.testing.assert_array_equal(src.read(1), from_mapping)


def test_a_multi_source_model_given_one_stac_item_is_a_one_line_failure(runs, stac_tree, capsys):
    out = runs["root"] / "pred_missing_source"
    code = main(["infer", "--ckpt", str(runs["multi_ckpt"]), "--out", str(out), str(stac_tree.root / stac_tree.item)])
    assert code == 1
    text = capsys.readouterr()
    assert "s2:blue" in text.out + text.err


def test_stac_model_predicts_an_item_given_by_path(runs, stac_tree):
    out = runs["root"] / "pred_item"
    assert main(["infer", "--ckpt", str(runs["stac_ckpt"]), "--out", str(out), str(stac_tree.root / stac_tree.item_pc)]) == 0
    with rasterio.open(out / f"{stac_tree.ids[1]}_classes.tif") as src:  # Planetary Computer keys: bands found by name
        assert (src.width, src.height) == (120, 120)
        threads = src.read(1)
        assert set(np.unique(threads)) <= {0, 1, 2, 255}
    # reader processes open the stacked scene from its path alone, as the threads do
    out = runs["root"] / "pred_item_processes"
    assert main(["infer", "--ckpt", str(runs["stac_ckpt"]), "--out", str(out), "--reader", "processes", "--readers", "2",
                 str(stac_tree.root / stac_tree.item_pc)]) == 0
    with rasterio.open(out / f"{stac_tree.ids[1]}_classes.tif") as src:
        np.testing.assert_array_equal(src.read(1), threads)


def test_check_reports_every_source_of_every_scene(runs, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # a wide table: no cell folded
    assert main(["check", "--config", str(runs["multi"]), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "s1: EPSG:4326" in out and "dem: EPSG:3035" in out and "covers 100%" in out
    assert "2 files" in out, [l for l in out.splitlines() if "dem" in l]  # the DEM's two tiles
