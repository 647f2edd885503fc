"""SceneStack: several sources in their own CRS, resolution, dtype and nodata, read on one reference grid."""

from __future__ import annotations

import math
import multiprocessing
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.warp import reproject
from rasterio.windows import Window

from geobp.errors import ConfigError, DataNotFoundError, GeoreferenceError, RasterReadError
from geobp.raster import project_bounds
from geobp.sources.bandref import BandRef
from geobp.sources.grid import Grid, coverage, overlaps
from geobp.sources.stack import SceneStack, build_stack, build_stacks, close_datasets
from tests.conftest import write_tif

UTM = "EPSG:32633"
X0, Y0 = 500000.0, 5000000.0
SIZE = 96  # reference pixels (10 m) per side
WINDOWS = [Window(0, 0, 32, 32), Window(24, 40, 32, 32), Window(64, 64, 32, 32), Window(0, 80, 96, 16),
           Window(70, 5, 26, 19)]


def s2_item(root: Path, seed: int = 0) -> list[BandRef]:
    """An S2-like item: B02 and B04 at 10 m, B11 and B12 at 20 m, B01 at 60 m, uint16, nodata 0; holes in B04 and B12."""
    rng = np.random.default_rng(seed)
    refs = []
    for name, res, method in (("B01", 60, "nearest"), ("B02", 10, "bilinear"), ("B04", 10, "bilinear"),
                              ("B11", 20, "bilinear"), ("B12", 20, "bilinear")):
        n = SIZE * 10 // res
        data = rng.integers(100, 5000, (n, n), dtype=np.uint16)
        if name == "B04":
            data[10:14, 50:60] = 0
        if name == "B12":  # B11 has data there: B12's own nodata must still count (bands warped together)
            data[30:34, 5:9] = 0
        write_tif(root / f"{name}.tif", data, crs=UTM, transform=from_origin(X0, Y0, res, res), nodata=0)
        refs.append(BandRef(name, str(root / f"{name}.tif"), resampling=method, source="s2"))
    return refs


def reference_grid() -> Grid:
    return Grid(UTM, tuple(from_origin(X0, Y0, 10, 10))[:6], SIZE, SIZE)  # type: ignore[arg-type]


def projected(path: str, grid: Grid, method: str, dtype: str = "float32", nodata: float | None = None) -> np.ndarray:
    """``rasterio.warp.reproject`` of band 1 of ``path`` onto ``grid`` (the expected values)."""
    with rasterio.open(path) as src:
        src_nodata = src.nodata if nodata is None else nodata
        dst_nodata = src_nodata if src_nodata is not None else math.nan
        out = np.full(grid.shape, dst_nodata, dtype)
        reproject(rasterio.band(src, 1), out, src_nodata=src_nodata, dst_transform=grid.affine, dst_crs=grid.crs,
                  dst_nodata=dst_nodata, resampling=Resampling[method])
    return out


def lonlat_file(path: Path, res: float, margin: float, data_fn, dtype: str = "float32", nodata: float | None = math.nan,
                bounds: tuple[float, float, float, float] | None = None, crs: str = "EPSG:4326") -> Path:
    """A raster in ``crs`` (degrees or metres) covering the reference scene with ``margin``, values from ``data_fn(h, w)``."""
    l, b, r, t = bounds or project_bounds(UTM, crs, X0, Y0 - SIZE * 10, X0 + SIZE * 10, Y0)
    l, b, r, t = l - margin, b - margin, r + margin, t + margin
    w, h = math.ceil((r - l) / res), math.ceil((t - b) / res)
    return write_tif(path, data_fn(h, w).astype(dtype), crs=crs, transform=from_origin(l, t, res, res), nodata=nodata)


def s1_file(root: Path) -> Path:
    """S1-like VV: float32 dB in EPSG:4326 at ~17 m, NaN nodata, with a NaN hole."""
    def data(h: int, w: int) -> np.ndarray:
        yy, xx = np.mgrid[0:h, 0:w]
        vv = -20 + 10 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
        vv[h // 2 - 3 : h // 2 + 3, w // 2 - 3 : w // 2 + 3] = np.nan
        return vv
    return lonlat_file(root / "s1_vv.tif", 0.00015, 0.001, data)


@pytest.fixture
def s2(tmp_path: Path) -> list[BandRef]:
    return s2_item(tmp_path / "s2")


@pytest.fixture(autouse=True)
def _close() -> None:
    yield
    close_datasets()


# ----- the reference grid and Sentinel-2 per-band files ------------------------------------


def test_s2_reference_is_the_finest_band_and_every_band_equals_reproject(s2: list[BandRef]) -> None:
    stack = build_stack(s2)
    assert stack is not None
    assert stack.grid == reference_grid()  # the 10 m file's grid, though B01 (60 m) is listed first
    assert stack.band_names == ("B01", "B02", "B04", "B11", "B12")  # one source: the bare names
    assert stack.dtypes == ("uint16",) * 5 and stack.nodata == (0,) * 5
    assert stack.bands[1].parts[0].offset == (0, 0) and stack.bands[3].parts[0].offset is None  # copy vs warp
    assert (3, 4) in stack._plan  # B11 and B12 share a grid: warped together
    # warped in the band's dtype (uint16, as reproject onto a uint16 array), then given as float32
    expected = np.stack([projected(r.path, stack.grid, r.resampling, "uint16") for r in s2]).astype(np.float32)
    for window in WINDOWS:
        arr, valid = stack.read(window)
        sl = window.toslices()
        assert arr.dtype == np.float32 and arr.shape == (5, window.height, window.width)
        np.testing.assert_array_equal(arr, expected[(slice(None), *sl)], err_msg=str(window))
        assert (valid == (expected[(slice(None), *sl)] != 0).all(0)).all()
    small = build_stack(s2, warp_block=16)  # warped in 16 px blocks: the same values
    for window in WINDOWS:
        np.testing.assert_array_equal(small.read(window)[0], stack.read(window)[0])
    _, valid = stack.read(Window(48, 8, 16, 8))
    assert not valid[2:6, 2:12].any() and valid[0].all()  # B04's hole (rows 10-13, cols 50-59)
    _, valid = stack.read(Window(0, 56, 24, 16))
    assert not valid[4:12, 10:18].all() and valid[:, 20:].all()  # B12's hole (20 m rows 30-33, cols 5-8)


def test_raw_dtype_read_keeps_uint16(s2: list[BandRef]) -> None:
    stack = build_stack(s2)
    arr, _ = stack.read(Window(0, 0, 32, 32), out_dtype=None)
    assert arr.dtype == np.uint16
    with rasterio.open(s2[2].path) as src:
        np.testing.assert_array_equal(arr[2], src.read(1, window=Window(0, 0, 32, 32)))


def test_finest_file_ties_go_to_the_first_listed(tmp_path: Path) -> None:
    a = write_tif(tmp_path / "a.tif", np.ones((8, 8), np.uint8), crs=UTM, transform=from_origin(X0, Y0, 10, 10))
    b = write_tif(tmp_path / "b.tif", np.ones((8, 8), np.uint8), crs=UTM, transform=from_origin(X0 + 5, Y0, 10, 10))
    stack = build_stack([BandRef("A", str(a)), BandRef("B", str(b))])
    assert stack.grid.transform[2] == X0
    stack = build_stack([BandRef("B", str(b)), BandRef("A", str(a))])
    assert stack.grid.transform[2] == X0 + 5


def test_window_reaching_outside_the_reference_is_invalid_there(s2: list[BandRef]) -> None:
    stack = build_stack(s2)
    arr, valid = stack.read(Window(-8, 80, 32, 32))
    inner, inner_valid = stack.read(Window(0, 80, 24, 16))
    assert not valid[:, :8].any() and not valid[16:].any()
    np.testing.assert_array_equal(arr[:, :16, 8:], inner)
    np.testing.assert_array_equal(valid[:16, 8:], inner_valid)
    assert (arr[:, 16:] == 0).all()  # S2's nodata where nothing is read
    arr, valid = stack.read(Window(200, 200, 8, 8))
    assert not valid.any()


# ----- other sources: another CRS and resolution, NaN nodata, mosaics ----------------------


def test_s1_in_another_crs_with_nan_nodata_equals_reproject_and_its_hole_is_invalid(tmp_path: Path, s2) -> None:
    vv = s1_file(tmp_path)
    stack = build_stack(s2, {"s1": [BandRef("VV", str(vv))]})
    assert stack.band_names == ("s2:B01", "s2:B02", "s2:B04", "s2:B11", "s2:B12", "s1:VV")
    assert stack.dtypes[-1] == "float32" and math.isnan(stack.nodata[-1])
    expected = projected(str(vv), stack.grid, "bilinear")
    hole = np.isnan(expected)
    assert 0 < hole.sum() < 200  # the NaN hole lands inside the scene
    for window in [*WINDOWS, Window(0, 0, SIZE, SIZE)]:
        arr, valid = stack.read(window)
        sl = window.toslices()
        np.testing.assert_array_equal(arr[5], expected[sl], err_msg=str(window))
        assert not valid[hole[sl]].any()
    _, valid = stack.read(Window(0, 0, SIZE, SIZE))
    s2_only = build_stack(s2).read(Window(0, 0, SIZE, SIZE))[1]
    np.testing.assert_array_equal(valid, s2_only & ~hole)  # reference valid AND every source's valid


def _dem(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return 300 + 2.0 * xx + 0.5 * yy + 3 * np.sin(xx / 3.0)


def dem_tiles(root: Path) -> tuple[Path, list[Path]]:
    """A DEM in EPSG:3035 at 30 m, written whole (the merged mosaic) and as two tiles split at a seam."""
    merged = lonlat_file(root / "dem_merged.tif", 30.0, 60.0, _dem, nodata=-9999.0, crs="EPSG:3035")
    with rasterio.open(merged) as src:
        data, transform = src.read(1), src.transform
    seam = data.shape[1] // 2 + 1  # the seam runs through the middle of the scene
    left = write_tif(root / "dem_a.tif", data[:, :seam], crs="EPSG:3035", transform=transform, nodata=-9999.0)
    right = write_tif(root / "dem_b.tif", data[:, seam:], crs="EPSG:3035", nodata=-9999.0,
                      transform=transform * rasterio.Affine.translation(seam, 0))
    return merged, [left, right]


def test_dem_mosaic_of_two_tiles_equals_reproject_of_the_merged_dem(tmp_path: Path, s2) -> None:
    merged, tiles = dem_tiles(tmp_path)
    far = write_tif(tmp_path / "dem_far.tif", np.zeros((4, 4), np.float32), crs="EPSG:3035", nodata=-9999.0,
                    transform=from_origin(1e6, 1e6, 30, 30))
    refs = [BandRef("elevation", str(p), source="dem") for p in (far, *tiles)]
    stack = build_stack(s2, {"dem": refs})
    assert stack.band_names[-1] == "dem:elevation"
    (part,) = stack.bands[-1].parts  # the far tile is dropped, the two on one lattice are one mosaic
    assert part.files == tuple(str(p) for p in tiles)
    expected = projected(str(merged), stack.grid, "bilinear")
    assert (expected != -9999).all()
    for window in [*WINDOWS, Window(0, 0, SIZE, SIZE)]:
        arr, valid = stack.read(window)
        np.testing.assert_array_equal(arr[-1], expected[window.toslices()], err_msg=str(window))
    summary = {s.source: s for s in stack.describe()}["dem"]
    assert summary.coverage == 1.0 and summary.crs == ("EPSG:3035",) and summary.res == ((30.0, 30.0),)
    assert summary.files == tuple(str(p) for p in tiles)


def test_mosaic_first_valid_pixel_wins(tmp_path: Path) -> None:
    ref = write_tif(tmp_path / "ref.tif", np.ones((16, 16), np.uint8), crs=UTM, transform=from_origin(X0, Y0, 10, 10))
    first = np.full((16, 16), 1.0, np.float32)
    first[4:8, 4:8] = np.nan
    a = write_tif(tmp_path / "a.tif", first, crs=UTM, transform=from_origin(X0, Y0, 10, 10), nodata=math.nan)
    b = write_tif(tmp_path / "b.tif", np.full((16, 16), 2.0, np.float32), crs=UTM, nodata=math.nan,
                  transform=from_origin(X0 + 40, Y0, 10, 10))  # overlaps a from column 4, reaches past the scene
    stack = build_stack([BandRef("r", str(ref), source="ref")],
                        {"x": [BandRef("v", str(a)), BandRef("v", str(b))]})
    arr, valid = stack.read(Window(0, 0, 16, 16))
    want = np.full((16, 16), 1.0, np.float32)
    want[4:8, 4:8] = 2.0  # a's hole, filled by b
    np.testing.assert_array_equal(arr[1], want)
    assert valid.all()
    # listed the other way round, b wins wherever it has data
    stack = build_stack([BandRef("r", str(ref), source="ref")], {"x": [BandRef("v", str(b)), BandRef("v", str(a))]})
    arr, _ = stack.read(Window(0, 0, 16, 16))
    assert (arr[1][:, 4:] == 2).all() and (arr[1][:, :4] == 1).all()


def test_mosaic_across_lattices_fills_the_first_ones_gaps(tmp_path: Path, s2) -> None:
    """Tiles in two CRSs: each is warped, the earlier tile's data wins, the other fills its gaps."""
    _, (left, _) = dem_tiles(tmp_path)
    whole = lonlat_file(tmp_path / "dem_4326.tif", 0.0004, 0.001, lambda h, w: np.full((h, w), 7.0), nodata=-9999.0)
    stack = build_stack(s2, {"dem": [BandRef("elevation", str(left)), BandRef("elevation", str(whole))]})
    assert len(stack.bands[-1].parts) == 2
    arr, valid = stack.read(Window(0, 0, SIZE, SIZE))
    from_left = projected(str(left), stack.grid, "bilinear")
    has_left = from_left != -9999
    assert 0 < has_left.mean() < 1
    np.testing.assert_allclose(arr[-1][has_left], from_left[has_left], atol=1e-3)
    assert (arr[-1][~has_left] == 7.0).all()


def test_int_source_without_nodata_on_another_grid_reads_float_with_nan_outside_its_file(tmp_path: Path, s2) -> None:
    # a class map in EPSG:3035 covering only the scene's western part, no nodata tag
    l, b, r, t = project_bounds(UTM, "EPSG:3035", X0, Y0 - SIZE * 10, X0 + SIZE * 5, Y0)
    cls = write_tif(tmp_path / "cls.tif", np.full((int((t - b) / 20), int((r - l) / 20)), 3, np.uint8), crs="EPSG:3035",
                    transform=from_origin(l, t, 20, 20))
    stack = build_stack(s2, {"lc": [BandRef("class", str(cls), resampling="nearest")]})
    assert stack.dtypes[-1] == "float32" and math.isnan(stack.nodata[-1])
    arr, valid = stack.read(Window(0, 0, SIZE, SIZE))
    assert set(np.unique(arr[-1][~np.isnan(arr[-1])])) == {3.0}
    assert valid[:, :40].mean() > 0.9 and not valid[:, 60:].any()
    summary = stack.describe()[1]
    assert 0.3 < summary.coverage < 0.6


# ----- sources that do not cover the scene -------------------------------------------------


def _far_source(tmp_path: Path) -> Path:
    return write_tif(tmp_path / "far.tif", np.ones((8, 8), np.float32), crs=UTM, nodata=math.nan,
                     transform=from_origin(X0 + 1e5, Y0, 10, 10))


def test_uncovered_source_skips_the_scene_with_a_warning_naming_it(tmp_path: Path, s2) -> None:
    far = _far_source(tmp_path)
    with pytest.warns(UserWarning, match=r"B01.tif: source 'dem' has no file over this scene .* Fix: add 'dem' files"):
        assert build_stack(s2, {"dem": [BandRef("elevation", str(far))]}) is None
    other = s2_item(tmp_path / "other", seed=1)
    with pytest.warns(UserWarning, match="source 'dem'"):
        stacks = build_stacks([s2, other], {"dem": [BandRef("elevation", str(far))]})
    assert stacks == []


def test_uncovered_source_filled_as_nodata(tmp_path: Path, s2) -> None:
    far = _far_source(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stack = build_stack(s2, {"dem": [BandRef("elevation", str(far))]}, missing="fill")
    assert stack.band_names[-1] == "dem:elevation" and stack.bands[-1].parts == ()
    arr, valid = stack.read(Window(0, 0, 32, 32))
    assert np.isnan(arr[-1]).all() and not valid.any()
    summary = stack.describe()[1]
    assert summary.coverage == 0.0 and summary.files == ()
    with pytest.raises(ConfigError, match=r"unknown missing='drop' \(expected 'skip' or 'fill'\)\. Fix: "):
        build_stack(s2, {"dem": [BandRef("elevation", str(far))]}, missing="drop")  # type: ignore[arg-type]


# ----- names, descriptions, errors, processes ----------------------------------------------


def test_three_sources_band_names_and_description(tmp_path: Path, s2) -> None:
    vv = s1_file(tmp_path)
    _, tiles = dem_tiles(tmp_path)
    stack = build_stack(s2, {"s1": [BandRef("VV", str(vv))], "dem": [BandRef("elevation", str(p)) for p in tiles]})
    assert stack.band_names == ("s2:B01", "s2:B02", "s2:B04", "s2:B11", "s2:B12", "s1:VV", "dem:elevation")
    assert stack.sources == ("s2", "s1", "dem")
    assert stack.dtypes == ("uint16",) * 5 + ("float32", "float32")
    s2d, s1d, demd = stack.describe()
    assert s2d.crs == (UTM,) and s2d.res == ((60.0, 60.0), (10.0, 10.0), (20.0, 20.0)) and s2d.coverage == 1.0
    assert s1d.crs == ("EPSG:4326",) and s1d.bands == ("s1:VV",) and s1d.coverage == 1.0
    assert demd.bands == ("dem:elevation",) and len(demd.files) == 2
    arr, valid = stack.read(Window(32, 32, 32, 32))
    assert arr.shape == (7, 32, 32) and np.isfinite(arr[:, valid]).all()
    raw, raw_valid = stack.read(Window(32, 32, 32, 32), out_dtype=None)  # uint16 and float32: float32
    assert raw.dtype == np.float32 and (raw_valid == valid).all()
    as_int, _ = stack.read(Window(0, 0, SIZE, SIZE), out_dtype=np.int32)
    assert as_int.dtype == np.int32 and (as_int[5][~np.isfinite(stack.read(Window(0, 0, SIZE, SIZE))[0][5])] == 0).all()


def test_bad_path_is_a_one_line_error_naming_it(tmp_path: Path, s2) -> None:
    missing = tmp_path / "nope" / "VV.tif"
    with pytest.raises(DataNotFoundError) as err:
        build_stack(s2, {"s1": [BandRef("VV", str(missing))]})
    assert str(err.value).startswith(f"{missing}: file not found. Fix: ") and "\n" not in str(err.value)


def test_unreadable_and_unreferenced_files_are_one_line_errors(tmp_path: Path, s2) -> None:
    with pytest.raises(RasterReadError, match=r"^/vsimem/geobp-none\.tif: GDAL cannot open it .*\. Fix: check the URL"):
        build_stack(s2, {"s1": [BandRef("VV", "/vsimem/geobp-none.tif")]})
    bare = write_tif(tmp_path / "bare.tif", np.ones((8, 8), np.float32), crs=None)
    with pytest.raises(GeoreferenceError, match=r"bare\.tif: raster has no CRS\. Fix: "):
        build_stack(s2, {"s1": [BandRef("VV", str(bare))]})


def test_source_names_are_checked(tmp_path: Path, s2) -> None:
    vv = s1_file(tmp_path)
    unnamed = [BandRef(r.name, r.path) for r in s2]
    with pytest.raises(ConfigError, match=r"B01.tif: the reference source has no name .* Fix: set BandRef.source"):
        build_stack(unnamed, {"s1": [BandRef("VV", str(vv))]})
    with pytest.raises(ConfigError, match=r"s1_vv.tif: band 'VV' is listed under source 's1' but names source 'dem'"):
        build_stack(s2, {"s1": [BandRef("VV", str(vv), source="dem")]})
    with pytest.raises(ConfigError, match=r"source 's1' lists no file\. Fix: "):
        build_stack(s2, {"s1": []})


def _read_in_child(stack: SceneStack) -> np.ndarray:
    return stack.read(Window(8, 8, 16, 16))[0]


def test_stack_pickles_and_reads_in_forked_and_spawned_processes(tmp_path: Path, s2) -> None:
    vv = s1_file(tmp_path)
    stack = build_stack(s2, {"s1": [BandRef("VV", str(vv))]})
    here = stack.read(Window(8, 8, 16, 16))[0]  # the parent holds open datasets now
    clone = pickle.loads(pickle.dumps(stack))
    np.testing.assert_array_equal(clone.read(Window(8, 8, 16, 16))[0], here)
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(1) as pool:
            np.testing.assert_array_equal(pool.apply(_read_in_child, (stack,)), here)


def test_grid_window_bounds_overlap_and_coverage() -> None:
    grid = reference_grid()
    assert grid.window_bounds(Window(2, 3, 4, 5)) == (X0 + 20, Y0 - 80, X0 + 60, Y0 - 30)
    assert grid.bounds == (X0, Y0 - 960, X0 + 960, Y0)
    shifted = Grid(UTM, (20.0, 0.0, X0 + 40, 0.0, -20.0, Y0 - 60), 10, 10)
    assert grid.lattice_offset(shifted) is None  # 20 m: another pixel size
    on = Grid(UTM, (10.0, 0.0, X0 - 30, 0.0, -10.0, Y0 + 20), 10, 10)
    assert grid.lattice_offset(on) == (2, 3)
    off = Grid(UTM, (10.0, 0.0, X0 - 35, 0.0, -10.0, Y0), 10, 10)
    assert grid.lattice_offset(off) is None
    west = Grid(UTM, (10.0, 0.0, X0, 0.0, -10.0, Y0), 48, 96)
    assert overlaps(grid, west) and coverage(grid, [west]) == pytest.approx(0.5)
    assert not overlaps(grid, Grid(UTM, (10.0, 0.0, X0 + 955, 0.0, -10.0, Y0), 10, 10))  # a sliver of half a pixel


def test_open_datasets_stay_within_capacity(tmp_path: Path, s2, monkeypatch: pytest.MonkeyPatch) -> None:
    from geobp.sources import files as stack_module

    vv = s1_file(tmp_path)
    stack = build_stack(s2, {"s1": [BandRef("VV", str(vv))]})
    before = [stack.read(w)[0] for w in WINDOWS]
    assert len(stack_module.DATASETS._open) == 5  # 2 files on the lattice, 3 warped VRTs (B01, B11 + B12, VV)
    close_datasets()
    monkeypatch.setattr(stack_module.DATASETS, "capacity", 2)  # fewer than one read needs: files reopened
    for w, want in zip(WINDOWS, before):
        np.testing.assert_array_equal(stack.read(w)[0], want)
        assert len(stack_module.DATASETS._open) <= 2


def test_benchmark_section_runs_quick(tmp_path: Path) -> None:
    from benchmarks.common import Config
    from benchmarks.sources import run

    result = run(Config.quick_config(cache_dir=str(tmp_path), tiles=8, warmup_tiles=2))
    assert set(result["metrics"]["tiles_per_s"]) == {"stack_16", "stacked_16", "stack_64", "stacked_64"}
    assert result["targets"][0]["name"].startswith("sources: SceneStack / pre-stacked file")
