"""A label file's kind (raster or vector) comes from opening it, never from its name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.transform import from_origin

from geobp.data.alignment import align_labels
from geobp.data.datamodule import GeoTiffDataModule
from geobp.data.labels import LabelOptions, VectorInfo, find_label_sources, read_label_source
from geobp.errors import DataNotFoundError
from geobp.raster import RasterInfo, read_info
from tests.conftest import write_tif

CRS = "EPSG:32633"
TRANSFORM = from_origin(500000.0, 5000000.0, 30.0, 30.0)
#: raw training-raster codes 1..5 to classes 0..4, 0 (unlabelled) to the ignore index
LABEL_MAP = {0: 255, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4}


def landsat_scene(path: Path, size: int = 64) -> Path:
    """A 6-band uint16 scene on a 30 m UTM grid."""
    rng = np.random.default_rng(0)
    return write_tif(path, rng.integers(1, 4000, (6, size, size)).astype(np.uint16), crs=CRS, transform=TRANSFORM)


def sparse_training_raster(size: int = 64) -> np.ndarray:
    """uint8 classes 1..5 in scattered 8 px squares, 0 (unlabelled) elsewhere."""
    raw = np.zeros((size, size), np.uint8)
    for k, (r, c) in enumerate([(0, 0), (8, 40), (24, 16), (40, 48), (56, 8), (32, 32), (48, 24)]):
        raw[r : r + 8, c : c + 8] = k % 5 + 1
    return raw


def write_raster(path: Path, data: np.ndarray, driver: str, **options: str) -> Path:
    """``data`` [H, W] on the scene's grid, written by ``driver`` (with creation ``options``) whatever the file's suffix."""
    profile = dict(driver=driver, width=data.shape[1], height=data.shape[0], count=1, dtype=str(data.dtype),
                   crs=CRS, transform=TRANSFORM, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


@pytest.mark.parametrize("name,driver", [("training_data.gtif", "GTiff"), ("training_data.img", "HFA")])
def test_label_raster_with_any_suffix_trains_with_its_label_map(tmp_path, name, driver):
    image = landsat_scene(tmp_path / "scene" / "LC08_scene.tif")
    raw = sparse_training_raster()
    labels = write_raster(tmp_path / name, raw, driver)
    assert isinstance(read_label_source(labels), RasterInfo)

    dm = GeoTiffDataModule(root=str(tmp_path), images=str(image), labels=str(labels), num_classes=5,
                           label_map=LABEL_MAP, tile_size=32, val_fraction=0.0, validity="scan")
    with rasterio.open(dm.scenes[0].mask.path) as src:
        aligned = src.read(1)
    expected = np.vectorize(LABEL_MAP.get)(raw).astype(np.uint8)
    np.testing.assert_array_equal(aligned, expected)
    assert dm.label_reports is not None and dm.label_reports[0].method == ["copy"]
    assert dm.label_reports[0].histogram == [int((raw == k + 1).sum()) for k in range(5)]


def test_geojson_named_json_is_a_vector_file(tmp_path):
    feature = {"type": "Feature", "properties": {"cover": 2},
               "geometry": {"type": "Polygon", "coordinates": [[[500100, 4999100], [500600, 4999100], [500600, 4999600],
                                                                [500100, 4999600], [500100, 4999100]]]}}
    collection = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:{CRS.replace(':', '::')}"}},
                  "features": [feature]}
    path = tmp_path / "fields.json"
    path.write_text(json.dumps(collection))
    info = read_label_source(path)
    assert isinstance(info, VectorInfo) and info.fields == ("cover",)
    sources = find_label_sources(path, "cover")
    assert sources.vector is not None and sources.rasters == [] and sources.vector.path == str(path)


def test_a_file_that_is_neither_raster_nor_vector_is_one_error_line(tmp_path):
    text = tmp_path / "x.tif"
    text.write_text("class,name\n1,water\n")
    with pytest.raises(DataNotFoundError) as info:
        find_label_sources(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{text}: neither a raster GDAL can open nor a vector file OGR can open")
    assert "Fix: pass a label raster" in message


def test_a_folder_of_labels_lists_gtif_and_img_rasters(tmp_path):
    raw = sparse_training_raster()
    write_raster(tmp_path / "labels" / "a.gtif", raw, "GTiff")
    write_raster(tmp_path / "labels" / "b.img", raw, "HFA")
    (tmp_path / "labels" / "notes.txt").write_text("not a label")
    sources = find_label_sources(tmp_path / "labels")
    assert sorted(Path(r.path).name for r in sources.rasters) == ["a.gtif", "b.img"] and sources.vector is None


@pytest.mark.parametrize("name,driver", [("truth.jp2", "JP2OpenJPEG"), ("truth.nc", "netCDF"), ("truth.vrt", "VRT")])
def test_jp2_netcdf_and_vrt_label_rasters_align_onto_the_image(tmp_path, name, driver):
    image = landsat_scene(tmp_path / "scene.tif")
    raw = sparse_training_raster()
    if driver in ("VRT", "netCDF"):  # copies of a GeoTIFF (named like anything, for the VRT to point to)
        rasterio.shutil.copy(write_raster(tmp_path / "truth_data.bin", raw, "GTiff"), tmp_path / name, driver=driver)
        labels = tmp_path / name
    else:
        lossless = {"QUALITY": "100", "REVERSIBLE": "YES"} if driver == "JP2OpenJPEG" else {}
        labels = write_raster(tmp_path / name, raw, driver, **lossless)
    sources = find_label_sources(labels)
    assert [Path(r.path).name for r in sources.rasters] == [name] and sources.vector is None
    mask, report = align_labels(read_info(image), sources, LabelOptions(num_classes=5, label_map=LABEL_MAP))
    np.testing.assert_array_equal(mask, np.vectorize(LABEL_MAP.get)(raw).astype(np.uint8))
    assert report.coverage == pytest.approx((raw > 0).mean())
