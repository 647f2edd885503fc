"""data.images as published: STAC documents and several sources per scene, through the data module,
``geobp check`` and stack paths (geobp.sources.imagery, stackpath, stackreader)."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.warp import reproject
from rasterio.windows import Window

from geobp.data.datamodule import GeoTiffDataModule
from geobp.errors import ConfigError, DataNotFoundError, format_error
from geobp.raster import open_raster, project_bounds, read_info
from geobp.sources.imagery import resolve_images
from geobp.sources.locations import file_stamp, file_stem
from geobp.sources.stackpath import is_stack_path
from geobp.sources.stackreader import StackReader
from geobp.sources.urls import redact
from tests.conftest import write_tif
from tests.sources.test_stack import lonlat_file
from tests.sources.conftest import EPSG, EXTENT, NORTH, WEST, StacTree

UTM = f"EPSG:{EPSG}"
GRID = dict(crs=UTM, transform=from_origin(WEST, NORTH, 10, 10), width=120, height=120)


def lonlat(path: Path, res: float, fn, crs: str, nodata: float, margin: float) -> Path:
    """A raster in ``crs`` covering this scene's footprint (plus ``margin``), values ``fn(h, w)``."""
    footprint = project_bounds(UTM, crs, WEST, NORTH - EXTENT, WEST + EXTENT, NORTH)
    return lonlat_file(path, res, margin, fn, nodata=nodata, bounds=footprint, crs=crs)


def s1(root: Path) -> Path:
    """S1-like VV and VH: float32 dB in EPSG:4326, NaN nodata, a NaN hole in the middle; bands described."""
    def fn(h: int, w: int) -> np.ndarray:
        yy, xx = np.mgrid[0:h, 0:w]
        vv = -20 + 10 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
        vv[h // 2 - 3 : h // 2 + 3, w // 2 - 3 : w // 2 + 3] = np.nan
        return np.stack([vv, vv - 6])

    path = lonlat(root / "s1.tif", 0.00015, fn, "EPSG:4326", math.nan, 0.001)
    with rasterio.open(path, "r+") as dst:
        dst.descriptions = ("VV", "VH")
    return path


def dem_tiles(root: Path) -> list[Path]:
    """A 30 m DEM in EPSG:3035 as two tiles split through the scene."""
    def fn(h: int, w: int) -> np.ndarray:
        yy, xx = np.mgrid[0:h, 0:w]
        return 300 + 2.0 * xx + 0.5 * yy

    merged = lonlat(root / "dem_merged.tif", 30.0, fn, "EPSG:3035", -9999.0, 60.0)
    with rasterio.open(merged) as src:
        data, transform = src.read(1), src.transform
    seam = data.shape[1] // 2 + 1
    a = write_tif(root / "dem" / "a.tif", data[:, :seam], crs="EPSG:3035", transform=transform, nodata=-9999.0)
    b = write_tif(root / "dem" / "b.tif", data[:, seam:], crs="EPSG:3035", nodata=-9999.0,
                  transform=transform * rasterio.Affine.translation(seam, 0))
    return [a, b]


@pytest.fixture(scope="module")
def world(stac_tree: StacTree, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imagery")
    labels = np.zeros((120, 120), np.uint8)
    labels[:, 60:] = 1
    labels[60:, :30] = 2
    return {
        "labels": write_tif(root / "labels.tif", labels, crs=UTM, transform=GRID["transform"]),
        "s1": s1(root),
        "dem": root / "dem",
        "dem_tiles": dem_tiles(root),
        "root": root,
    }


def reprojected(path: Path, band: int, method: str, dtype: str = "float32") -> np.ndarray:
    """``rasterio.warp.reproject`` of one band onto the scene's 10 m grid (the expected values)."""
    with rasterio.open(path) as src:
        nodata = src.nodata if src.nodata is not None else math.nan
        out = np.full((120, 120), nodata, dtype)
        reproject(rasterio.band(src, band), out, src_nodata=nodata, dst_transform=GRID["transform"], dst_crs=UTM,
                  dst_nodata=nodata, resampling=Resampling[method])
    return out


def reprojected_together(path: Path, method: str) -> np.ndarray:
    """Every band of ``path`` reprojected in one warp, each band with its own nodata
    (``UNIFIED_SRC_NODATA=NO``), as the stack warps the bands of one file."""
    with rasterio.open(path) as src:
        out = np.full((src.count, 120, 120), math.nan, np.float32)
        reproject(src.read(), out, src_transform=src.transform, src_crs=src.crs, src_nodata=math.nan,
                  dst_transform=GRID["transform"], dst_crs=UTM, dst_nodata=math.nan, resampling=Resampling[method],
                  UNIFIED_SRC_NODATA="NO")
    return out


def module(images, tmp_path: Path, **kw) -> GeoTiffDataModule:
    options = dict(num_classes=3, tile_size=32, tiles_per_epoch=8, batch_size=4, val_fraction=0.5,
                   cache_dir=str(tmp_path / "cache"))
    return GeoTiffDataModule(images=images, labels=str(kw.pop("labels")), **{**options, **kw})


# ----- one STAC source: per-band COGs at three resolutions --------------------------------------


def test_stac_collection_trains_on_bands_chosen_by_common_name_at_their_own_resolution(stac_tree, world, tmp_path):
    dm = module(str(stac_tree.root / stac_tree.collection), tmp_path, labels=world["labels"],
                bands=["blue", "red", "swir16", "B08"], validity="scan")
    assert [s.name for s in dm.scenes] == list(stac_tree.ids[:2])  # one scene per item, named by its id
    assert dm.band_names == ["blue", "red", "swir16", "B08"]
    assert dm.preprocessing.dtype == "uint16" and dm.preprocessing.nodata == 0  # S2 alone keeps its dtype and nodata
    path = dm.scenes[0].image.path
    assert is_stack_path(path) and file_stem(path) == stac_tree.ids[0]
    with open_raster(path) as src:
        whole = src.read()
    # 10 m bands read as they are; the 20 m band equals a bilinear reproject onto the 10 m grid
    np.testing.assert_array_equal(whole[0], stac_tree.array(0, "B02")[0])
    np.testing.assert_array_equal(whole[3], stac_tree.array(0, "B08")[0])
    np.testing.assert_allclose(whole[2], reprojected(stac_tree.tif(0, "B11"), 1, "bilinear", "uint16"), atol=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["raw"].shape == (4, 4, 32, 32) and str(batch["raw"].dtype) == "torch.uint16"


def test_stac_band_errors_are_one_line_and_name_the_item(stac_tree, world, tmp_path):
    with pytest.raises(ConfigError, match=r"S2A_33UUP_20260601_0_L2A.*no band 'rde'.*(red|rededge)"):
        module(str(stac_tree.root / stac_tree.item), tmp_path, labels=world["labels"], bands=["blue", "rde"])
    with pytest.raises(DataNotFoundError, match=r"no such file|not found"):
        module(str(stac_tree.root / "missing.json"), tmp_path, labels=world["labels"])


# ----- several sources: S2 (reference), S1 in another CRS, a DEM mosaic ------------------------


def sources(stac_tree: StacTree, world: dict[str, Path], **s1_options) -> dict:
    return {"s2": str(stac_tree.root / stac_tree.item), "s1": {"images": str(world["s1"]), **s1_options},
            "dem": str(world["dem"])}


def test_several_sources_stack_onto_the_reference_grid_in_the_order_asked(stac_tree, world, tmp_path):
    dm = module(sources(stac_tree, world, resampling="bilinear"), tmp_path, labels=world["labels"],
                bands=["s1:VV", "s2:red", "dem:1", "s2:nir", "s1:VH"], split="blocks", split_block_size=64)
    assert dm.band_names == ["s1:VV", "s2:red", "dem:band_1", "s2:nir", "s1:VH"]
    assert dm.preprocessing.dtype == "float32" and math.isnan(dm.preprocessing.nodata)
    with open_raster(dm.scenes[0].image.path) as src:
        assert (src.width, src.height, src.crs.to_epsg()) == (120, 120, EPSG)
        got = src.read()
        valid = src.read_masks(1) > 0
    # VV and VH are warped together (one pixel mapping), each with its own nodata; at the rim of a
    # hole GDAL's warper then interpolates from the valid neighbours where a one-band reproject
    # gives nodata (21 pixels here), so the reference is the same joint warp
    vv = reprojected_together(world["s1"], "bilinear")[0]
    red = stac_tree.array(0, "B04")[0].astype(np.float32)
    dem = reprojected(world["root"] / "dem_merged.tif", 1, "bilinear")  # the two tiles are one mosaic: seamless
    # valid: every source has data (the S2 corner and the S1 hole are invalid, in every band)
    expected_valid = ~np.isnan(vv) & (red != 0) & (dem != -9999)
    np.testing.assert_array_equal(valid, expected_valid)
    assert not expected_valid.all() and expected_valid.mean() > 0.9
    # GDAL's warper maps pixels through an approximate transformer (at most 0.125 px off, in chunks
    # that depend on the band count): on this field (< 1.5 dB per pixel) values agree to 0.2 dB
    np.testing.assert_allclose(got[0][valid], vv[valid], atol=0.2)
    np.testing.assert_array_equal(got[1][valid], red[valid])
    np.testing.assert_allclose(got[2][valid], dem[valid], rtol=1e-6)
    assert np.isnan(got[:, ~valid]).all()
    # each source keeps its own statistics
    means = dm.preprocessing.mean
    assert -30 < means[0] < -10 and 4000 < means[1] < 6000 and 250 < means[2] < 700
    batch = next(iter(dm.train_dataloader()))
    assert batch["raw"].shape == (4, 5, 32, 32) and str(batch["raw"].dtype) == "torch.float32"


def test_all_bands_of_all_sources_when_none_are_chosen(stac_tree, world, tmp_path):
    (path,) = resolve_images(sources(stac_tree, world))
    names = read_info(path).descriptions
    assert names[:12] == tuple(f"s2:{k}" for k in ("coastal", "blue", "green", "red", "rededge1", "rededge2", "rededge3",
                                                   "nir", "nir08", "nir09", "swir16", "swir22"))
    assert names[12:] == ("s1:VV", "s1:VH", "dem:band_1")


@pytest.mark.parametrize("bands, message", [
    (["red"], r"band 'red' names no source.*write it as <source>:<band>, e.g. s2:red"),
    (["s3:red"], r"no source 's3' in data.images \(sources: s2, s1, dem\)"),
    (["s1:VV"], r"selects no band of the reference source 's2'"),
    (["s2:red", "s1:HH"], r"s1.tif: source 's1' has no band 'HH' \(its bands: VV, VH, or 1..2\)"),
])
def test_band_selection_errors_across_sources(stac_tree, world, bands, message):
    with pytest.raises(ConfigError, match=message):
        resolve_images(sources(stac_tree, world), bands)


@pytest.mark.parametrize("spec, message", [
    ({}, r"empty mapping"),
    ({"s2:x": "a.json"}, r"bad source name 's2:x'"),
    ({"s2": {"files": "a.json"}}, r"source 's2': unknown key\(s\) files.*keys: images, resampling, nodata"),
    ({"s2": {"images": []}}, r"source 's2' has no images"),
])
def test_bad_mappings_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_images(spec)


def test_a_scene_another_source_does_not_cover_is_left_out_naming_the_source(stac_tree, world, tmp_path):
    far = write_tif(tmp_path / "far" / "dem.tif", np.ones((8, 8), np.float32), crs="EPSG:3035", nodata=-9999.0,
                    transform=from_origin(1e6, 1e6, 30, 30))
    spec = {"s2": str(stac_tree.root / stac_tree.collection), "dem": [str(far), *map(str, world["dem_tiles"])]}
    assert len(resolve_images(spec)) == 2  # the far tile is dropped, the scenes kept
    with pytest.warns(UserWarning, match=r"source 'dem' has no file over this scene.*left out"):
        with pytest.raises(ConfigError, match=r"no scene is covered by every source"):
            resolve_images({"s2": spec["s2"], "dem": str(far)})


# ----- stack paths: names, cache keys, signatures ----------------------------------------------


def test_stack_paths_show_the_scene_name_and_no_url(stac_tree):
    (path,) = resolve_images(str(stac_tree.root / stac_tree.item), ["red"])
    assert format_error(path, "bad", "fix") == f"{stac_tree.ids[0]} (stack of 1 file): bad. Fix: fix."
    assert redact(f"reading {path} failed") == f"reading {stac_tree.ids[0]} (stack of 1 file) failed"
    assert str(stac_tree.root) not in redact(path)
    with StackReader(path) as src:
        assert src.profile["dtype"] == "uint16" and src.profile["nodata"] == 0
        with pytest.raises(ConfigError, match="full resolution only"):
            src.read(out_shape=(1, 10, 10))


def test_a_stack_cache_stamp_follows_its_files(tmp_path):
    band = write_tif(tmp_path / "item" / "B04.tif", np.ones((32, 32), np.uint16), crs=UTM,
                     transform=from_origin(WEST, NORTH, 10, 10), nodata=0)
    doc = {"type": "Feature", "stac_version": "1.0.0", "id": "one", "bbox": [0, 0, 1, 1], "properties": {"datetime": "2026-01-01T00:00:00Z"},
           "geometry": {"type": "Point", "coordinates": [0, 0]}, "links": [],
           "assets": {"B04": {"href": "./B04.tif", "type": "image/tiff; application=geotiff", "roles": ["data"]}}}
    item = tmp_path / "item" / "item.json"
    import json

    item.write_text(json.dumps(doc))
    (path,) = resolve_images(str(item))
    before = file_stamp(path)
    assert before == file_stamp(resolve_images(str(item))[0])  # the same files: the same key
    time.sleep(0.01)
    os.utime(band, ns=(time.time_ns(), time.time_ns()))
    assert file_stamp(path) != before  # a rewritten file: another key (its caches are rebuilt)


def test_signed_hrefs_stay_out_of_the_stack_display_and_cache_key(stac_tree, tmp_path):
    import json

    doc = json.loads((stac_tree.root / stac_tree.item).read_text())
    for key, asset in doc["assets"].items():
        asset["href"] = f"https://example.invalid/{key}.tif?se=2030&sig=SECRETSIG"
    (tmp_path / "signed.json").write_text(json.dumps(doc))
    from geobp.sources.stac import load_items, select_bands

    (item,) = load_items(tmp_path / "signed.json")
    refs = select_bands(item, ["red"])
    assert "SECRETSIG" in refs[0].path  # GDAL needs the signature to read
    from geobp.sources.stack import SceneStack, StackBand, _Part
    from geobp.sources.grid import Grid
    from geobp.sources.stackreader import stack_path

    grid = Grid(UTM, tuple(GRID["transform"])[:6], 120, 120)
    part = _Part(refs[0].path, 1, grid, (0, 0), 0.0, "uint16", (refs[0].path,))
    stack = SceneStack(grid, [StackBand("red", "", "bilinear", "uint16", 0.0, (part,))], [])
    path = stack_path(stack, "signed", (32, 32))
    assert "SECRETSIG" in path
    for shown in (redact(path), format_error(path, "x", "y"), file_stamp(path), file_stem(path)):
        assert "SECRETSIG" not in shown
    refreshed = path.replace("SECRETSIG", "NEWSIG")
    assert file_stamp(refreshed) == file_stamp(path)  # a refreshed signature finds the same caches


# ----- plain files: bands by name ---------------------------------------------------------------


def test_plain_files_take_band_names_from_their_descriptions(world, tmp_path):
    img = write_tif(tmp_path / "scene.tif", np.arange(3 * 120 * 120, dtype=np.uint16).reshape(3, 120, 120) % 1000 + 1,
                    crs=UTM, transform=GRID["transform"], nodata=0)
    with rasterio.open(img, "r+") as dst:
        dst.descriptions = ("B02", "B03", "B04")
    dm = module(str(img), tmp_path, labels=world["labels"], bands=["b04", "B02"], val_fraction=0.0, test_fraction=0.0)
    assert dm.bands == [3, 1] and dm.band_names == ["B04", "B02"]
    with pytest.raises(ConfigError, match=r"data.bands names band 'nir'.*their bands: B02, B03, B04"):
        module(str(img), tmp_path, labels=world["labels"], bands=["nir"])


# ----- STAC and sources in object storage -------------------------------------------------------


def _whole(path: str) -> np.ndarray:
    with open_raster(path) as src:
        return src.read()


def test_a_stac_item_over_http_and_on_s3_reads_as_the_local_one(stac_tree, http_server, s3_bucket, world,
                                                                read_options_restored):
    local = _whole(resolve_images(str(stac_tree.root / stac_tree.item), ["red", "swir16"])[0])
    (over_http,) = resolve_images(f"{http_server.url}/{stac_tree.item}", ["red", "swir16"])
    assert "/vsicurl/http://127.0.0.1" in over_http  # the assets' relative hrefs resolved against the URL
    np.testing.assert_array_equal(_whole(over_http), local)
    (on_s3,) = resolve_images(f"s3://{s3_bucket}/{stac_tree.item}", ["red", "swir16"])
    assert "/vsis3/" in on_s3
    np.testing.assert_array_equal(_whole(on_s3), local)
    # several sources, the reference in object storage and another source local
    spec = {"s2": f"s3://{s3_bucket}/{stac_tree.item}", "s1": str(world["s1"])}
    (mixed,) = resolve_images(spec, ["s2:red", "s1:VV"])
    local_mixed = resolve_images({"s2": str(stac_tree.root / stac_tree.item), "s1": str(world["s1"])}, ["s2:red", "s1:VV"])[0]
    np.testing.assert_array_equal(_whole(mixed), _whole(local_mixed))


def test_signed_stac_hrefs_train_and_their_signature_is_in_no_file_written(stac_tree, http_server, world, tmp_path,
                                                                           read_options_restored):
    import json

    doc = json.loads((stac_tree.root / stac_tree.item).read_text())
    for asset in doc["assets"].values():  # absolute, signed hrefs, as a Planetary Computer search returns them
        if asset["href"].startswith("./") and asset["href"].endswith(".tif"):
            asset["href"] = f"{http_server.url}/{stac_tree.ids[0]}/{asset['href'][2:]}?se=2030-01-01&sig=SECRETSIG"
    item = tmp_path / "signed_item.json"
    item.write_text(json.dumps(doc))
    dm = module(str(item), tmp_path, labels=world["labels"], bands=["red", "swir16"], split="blocks",
                split_block_size=64, validity="scan")
    batch = next(iter(dm.train_dataloader()))  # statistics, validity and aligned labels cached, tiles read
    assert batch["raw"].shape[1] == 2
    assert "SECRETSIG" in dm.scenes[0].image.path  # GDAL needs it to read
    written = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert written  # the caches exist
    for path in written:
        assert "SECRETSIG" not in str(path) and b"SECRETSIG" not in path.read_bytes(), path
    assert "SECRETSIG" not in json.dumps(dict(dm.hparams), default=str)


def test_infer_reports_a_scene_another_source_does_not_cover_as_a_failed_input(stac_tree, tmp_path):
    from geobp.inference.batch import expand_inputs

    far = write_tif(tmp_path / "far.tif", np.ones((8, 8), np.float32), crs="EPSG:3035", nodata=-9999.0,
                    transform=from_origin(1e6, 1e6, 30, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing escapes as a warning: the left-out scene is a reported problem
        rasters, problems = expand_inputs([{"s2": str(stac_tree.root / stac_tree.item), "dem": str(far)}],
                                          ["s2:red", "dem:band_1"], 32)
    assert rasters == []
    messages = [m for name, m in problems if name == "--images"]
    assert any("source 'dem' has no file over this scene" in m for m in messages)
    assert any("no scene is covered by every source" in m for m in messages)
