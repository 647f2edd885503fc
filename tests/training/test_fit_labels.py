"""End to end: `geobp fit` on every label form (another CRS, a mosaic, a vector file, Sen1Floods11 as published)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml

from geobp.cli import main
from geobp.data.datamodule import GeoTiffDataModule
from geobp.data.synth import write_scenes
from geobp.task import SegmentationTask
from tests.conftest import write_tif
from tests.data.test_labels import IMAGE_CRS, labels_around, nearest, sen1floods11, write_image


def fit_config(tmp_path: Path, **data) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "t"}},
        },
        "model": {"encoder": "resnet18", "model_kwargs": {"decoder_channels": [32, 16, 16, 8, 8]}},
        "data": {"num_classes": 3, "tile_size": 32, "tiles_per_epoch": 8, "batch_size": 4, "split": "blocks",
                 "split_block_size": 32, "val_fraction": 0.25, **data},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit_and_load(tmp_path: Path, **data) -> SegmentationTask:
    assert main(["fit", "--config", str(fit_config(tmp_path, **data))]) == 0
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    return SegmentationTask.from_checkpoint(last)


@pytest.mark.slow
def test_fit_on_a_land_cover_map_in_another_crs(tmp_path):
    for i, name in enumerate("ab"):
        write_image(tmp_path / "img" / f"{name}.tif", origin=(500000.0 + 640 * i, 5000000.0), seed=i)
    labels, transform = labels_around(tmp_path / "img" / "a.tif", "EPSG:3035", 30.0, margin=1.2)
    write_tif(tmp_path / "worldcover.tif", labels * 10 + 10, crs="EPSG:3035", transform=transform, block=None)
    task = fit_and_load(tmp_path, images=str(tmp_path / "img"), labels=str(tmp_path / "worldcover.tif"),
                        label_map={10: 0, 20: 1, 30: 2}, class_names=["tree", "grass", "crop"])
    assert task.hparams["class_names"] == ["tree", "grass", "crop"] and task.hparams["in_channels"] == 3
    assert list((tmp_path / "img" / ".geobp_cache" / "labels").glob("a.*.tif"))


@pytest.mark.slow
def test_fit_on_a_map_in_another_crs_trains_as_on_masks_warped_by_hand(tmp_path):
    """The issue's "same accuracy as the data prepared by hand": the same model, tile for tile.

    By hand: the land-cover map warped onto each image's grid (nearest neighbour, as
    ``gdalwarp -r near`` would), saved as ``masks/`` beside ``images/``. The fit on the map itself
    must train the very same weights (so reach the same accuracy) as the fit on those masks.
    """
    for i, name in enumerate("ab"):
        write_image(tmp_path / "hand" / "images" / f"{name}.tif", origin=(500000.0 + 640 * i, 5000000.0), seed=i)
    labels, transform = labels_around(tmp_path / "hand" / "images" / "a.tif", "EPSG:3035", 30.0, margin=1.2)
    write_tif(tmp_path / "landcover.tif", labels, crs="EPSG:3035", transform=transform, block=None)
    for name in "ab":
        image = tmp_path / "hand" / "images" / f"{name}.tif"
        warped = nearest(labels, transform, "EPSG:3035", image)
        assert (warped != 255).all()  # the map covers both images
        write_tif(tmp_path / "hand" / "masks" / f"{name}.tif", warped, crs=IMAGE_CRS,
                  transform=rasterio.open(image).transform)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.manual_seed(0)
    by_hand = fit_and_load(tmp_path / "a", root=str(tmp_path / "hand"))
    torch.manual_seed(0)
    from_map = fit_and_load(tmp_path / "b", images=str(tmp_path / "hand" / "images"), labels=str(tmp_path / "landcover.tif"),
                            cache_dir=str(tmp_path / "cache"))
    a, b = by_hand.state_dict(), from_map.state_dict()
    assert a.keys() == b.keys()
    changed = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert changed == []  # any label pixel placed otherwise would change the gradients, so the weights


@pytest.mark.slow
def test_fit_on_a_mosaic_of_label_tiles(tmp_path):
    write_image(tmp_path / "img" / "a.tif")
    labels, transform = labels_around(tmp_path / "img" / "a.tif", IMAGE_CRS := "EPSG:32633", 20.0)
    h, w = labels.shape
    for i, (r0, c0) in enumerate([(0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)]):
        tf = transform * rasterio.Affine.translation(c0, r0)
        write_tif(tmp_path / "lab" / f"t{i}.tif", labels[r0 : r0 + h // 2 + 1, c0 : c0 + w // 2 + 1], crs=IMAGE_CRS, transform=tf, block=None)
    fit_and_load(tmp_path, images=str(tmp_path / "img" / "*.tif"), labels=[str(p) for p in sorted((tmp_path / "lab").iterdir())])


@pytest.mark.slow
def test_fit_on_polygons_from_a_gis(tmp_path):
    geopandas = pytest.importorskip("geopandas")
    from shapely.geometry import box

    write_image(tmp_path / "img" / "a.tif")
    rng = np.random.default_rng(0)
    polys, names = [], []
    for r in range(0, 640, 80):
        for c in range(0, 640, 80):
            polys.append(box(500000 + c, 5000000 - r - 80, 500000 + c + 80, 5000000 - r))
            names.append(["water", "forest", "field"][int(rng.integers(0, 3))])
    frame = geopandas.GeoDataFrame({"landuse": names}, geometry=polys, crs="EPSG:32633").to_crs("EPSG:3857")
    frame.to_file(tmp_path / "fields.gpkg", driver="GPKG")
    task = fit_and_load(tmp_path, images=str(tmp_path / "img"), labels=str(tmp_path / "fields.gpkg"),
                        label_field="landuse", class_names=["water", "forest", "field"])
    assert task.hparams["class_names"] == ["water", "forest", "field"]


@pytest.mark.slow
def test_fit_on_sen1floods11_as_published(tmp_path):
    images, labels = sen1floods11(tmp_path, names=("Bolivia_1", "Bolivia_2", "Ghana_3", "Ghana_4"))
    fit_and_load(tmp_path, images=str(images / "*_S2Hand.tif"), labels=str(labels), label_map={-1: 255},
                 num_classes=2, class_names=["dry", "water"], split="scene", val_fraction=0.25, nodata=None)


def test_images_and_labels_options_give_the_same_tiles_as_root(tmp_path):
    """data.images + data.labels on images/ and masks/ (same grid: copied) read exactly what data.root reads."""
    root = tmp_path / "scenes"
    write_scenes(root, scenes=2, size=64, bands=3, classes=3, block_size=32)
    kw = dict(num_classes=3, tile_size=32, tiles_per_epoch=8, batch_size=8, val_fraction=0.5, augment=False)
    by_root = GeoTiffDataModule(str(root), **kw)
    by_labels = GeoTiffDataModule(images=str(root / "images"), labels=str(root / "masks"), cache_dir=str(tmp_path / "c"), **kw)
    assert [s.name for s in by_labels.scenes] == [s.name for s in by_root.scenes]
    assert by_labels.label_reports is not None and all(r.method == ["copy"] for r in by_labels.label_reports)
    for a, b in zip(by_root.scenes, by_labels.scenes):
        with rasterio.open(a.mask.path) as sa, rasterio.open(b.mask.path) as sb:
            np.testing.assert_array_equal(sa.read(1), sb.read(1))
            assert sb.block_shapes[0] == (32, 32)
    ba, bb = next(iter(by_root.train_dataloader())), next(iter(by_labels.train_dataloader()))
    assert torch.equal(ba["raw"], bb["raw"]) and torch.equal(ba["mask"], bb["mask"])


def test_data_options_errors(tmp_path):
    with pytest.raises(Exception, match=r"no data given\. Fix: set data.root, or data.images and data.labels"):
        GeoTiffDataModule(num_classes=3)
    write_image(tmp_path / "img" / "a.tif")
    with pytest.raises(Exception, match=r"data.images is set but not data.labels"):
        GeoTiffDataModule(images=str(tmp_path / "img"), num_classes=3)
    with pytest.raises(Exception, match=r"num_classes is not set\. Fix: set data.num_classes"):
        GeoTiffDataModule(images=str(tmp_path / "img"), labels=str(tmp_path / "img"))
