"""The streamed vectorizer: equal to rasterio.features.shapes on the whole map, sieve, simplify, formats, atomic writes."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from rasterio.transform import from_origin

from geobp.errors import BandMismatchError, ConfigError, OutputExistsError, RasterMismatchError, RasterReadError
from geobp.inference import vectorfile
from geobp.inference.regions import RegionStream, Regions
from geobp.inference.vectorize import VectorOptions, parse_classes, vector_path, vectorize_class_map
from tests.conftest import write_tif

TRANSFORM = from_origin(500000.0, 5000000.0, 10.0, 10.0)
PIXEL_AREA = 100.0
NODATA = 255


def class_map(path: Path, data: np.ndarray, names: str | None = "water,forest,crop,urban", block: int = 16) -> Path:
    """A geobp-like class map: uint8, nodata 255, class names in the CLASS_NAMES tag."""
    write_tif(path, data.astype(np.uint8), nodata=NODATA, block=block, transform=TRANSFORM)
    if names:
        with rasterio.open(path, "r+") as ds:
            ds.update_tags(CLASS_NAMES=names)
    return path


def blocky(seed: int, shape=(40, 45), cell=3, classes=4, nodata_fraction=0.05) -> np.ndarray:
    """Random classes in cells of ``cell`` pixels, plus single pixels and some nodata: regions of every shape."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, classes, (shape[0] // cell + 1, shape[1] // cell + 1))
    data = np.kron(cells, np.ones((cell, cell), int))[: shape[0], : shape[1]].astype(np.uint8)
    speckle = rng.random(shape) < 0.03
    data[speckle] = rng.integers(0, classes, int(speckle.sum()))
    data[rng.random(shape) < nodata_fraction] = NODATA
    return data


def whole_map_regions(data: np.ndarray, keep: np.ndarray) -> list[tuple[int, shapely.Polygon]]:
    """rasterio.features.shapes over the whole map at once (4-connected), in the CRS."""
    return [(int(v), shapely.geometry.shape(g)) for g, v in rasterio.features.shapes(data, mask=keep, connectivity=4, transform=TRANSFORM)]


def footprint(mask: np.ndarray) -> shapely.Geometry:
    """The pixels of ``mask`` as one geometry in the CRS."""
    ones = np.ones(mask.shape, np.uint8)
    return shapely.union_all([shapely.geometry.shape(g) for g, _ in rasterio.features.shapes(ones, mask=mask, transform=TRANSFORM)])


def read(path: Path) -> gpd.GeoDataFrame:
    return gpd.read_parquet(path) if path.suffix == ".parquet" else gpd.read_file(path)


def assert_same_regions(df: gpd.GeoDataFrame, expected: list[tuple[int, shapely.Polygon]], keep: np.ndarray, data: np.ndarray) -> None:
    assert len(df) == len(expected)
    assert df.geometry.is_valid.all() and set(df.geom_type) == {"Polygon"}
    got = sorted(zip(df.class_id.tolist(), df.area.tolist()))
    want = sorted((c, g.area) for c, g in expected)
    assert [c for c, _ in got] == [c for c, _ in want]
    assert np.allclose([a for _, a in got], [a for _, a in want], atol=PIXEL_AREA)
    assert (df.pixels * PIXEL_AREA == df.area).all()
    for c in np.unique(data[keep]):
        mask_union = footprint(keep & (data == c))
        assert shapely.union_all(df.geometry[df.class_id == c].values).symmetric_difference(mask_union).area < 1e-6


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 1000])  # 16: the class map's tile edges; 1000: one strip
def test_streamed_polygons_equal_shapes_on_the_whole_map(tmp_path, rows):
    data = blocky(rows)
    src = class_map(tmp_path / "a_classes.tif", data)
    summary = vectorize_class_map(src, options=VectorOptions(strip_pixels=rows * data.shape[1]))
    assert summary.path == tmp_path / "a_classes.gpkg"
    keep = data != NODATA
    assert_same_regions(read(summary.path), whole_map_regions(data, keep), keep, data)


def test_region_stream_over_random_maps_and_strip_heights():
    rng = np.random.default_rng(7)
    for trial in range(12):
        h, w = rng.integers(1, 30, 2)
        data = rng.integers(0, 3, (h, w)).astype(np.uint8)  # many diagonal contacts and holes
        keep = data != 2 if trial % 2 else np.ones_like(data, bool)
        whole = [(int(v), shapely.geometry.shape(g)) for g, v in rasterio.features.shapes(data, mask=keep, connectivity=4)]
        for rows in (1, 2, 5):
            stream = RegionStream(int(w))
            parts = [stream.add(data[r:r + rows], keep[r:r + rows]) for r in range(0, int(h), rows)]
            regions = Regions.concat([*parts, stream.finish()])
            assert len(regions) == len(whole)
            assert shapely.is_valid(regions.geometry).all()
            assert sorted(zip(regions.class_id.tolist(), shapely.area(regions.geometry).tolist())) == sorted((c, g.area) for c, g in whole)


def test_region_stream_stitches_the_same_polygons_as_shapes_without_overlay(monkeypatch):
    """Vertex for vertex (up to the ring's start and orientation) what shapes gives on the whole map, on the
    stitched path (the overlay fallback never runs), with class ids beyond int32 and with confidence sums."""
    from geobp.inference import regions

    def no_overlay(*args, **kwargs):
        raise AssertionError("the stitching fell back to an overlay")

    monkeypatch.setattr(regions.shapely, "coverage_union_all", no_overlay)

    def canonical(classes, geometry):
        return sorted(zip(classes, shapely.to_wkb(shapely.normalize(np.asarray(geometry, object)))))

    rng = np.random.default_rng(11)
    for trial in range(30):
        h, w = rng.integers(2, 25, 2)
        data = rng.integers(0, 3, (h, w)).astype(np.uint8)
        if trial % 3 == 0:  # blocks: larger regions, with holes, across several strips
            data = np.kron(rng.integers(0, 3, (h // 3 + 1, w // 3 + 1)), np.ones((3, 3), np.uint8))[:h, :w].astype(np.uint8)
        keep = data != 2 if trial % 2 else np.ones_like(data, bool)
        whole = canonical(*zip(*[(int(v), shapely.geometry.shape(g)) for g, v in rasterio.features.shapes(data, mask=keep, connectivity=4)]))
        offset = 1 << 40
        for rows, classes, confidence in ((1, data, None), (2, data.astype(np.int64) + offset, None), (3, data, np.ones(data.shape, np.float32))):
            stream = RegionStream(int(w))
            parts = [stream.add(classes[r:r + rows], keep[r:r + rows], None if confidence is None else confidence[r:r + rows])
                     for r in range(0, int(h), rows)]
            regions_ = Regions.concat([*parts, stream.finish()])
            assert shapely.is_valid(regions_.geometry).all()
            assert (regions_.pixels == shapely.area(regions_.geometry)).all()
            if confidence is not None:
                assert np.array_equal(regions_.confidence_sum, regions_.pixels)
            ids = (regions_.class_id - (offset if classes.dtype == np.int64 else 0)).tolist()
            assert canonical(ids, regions_.geometry) == whole


def test_holes_and_islands_across_strips(tmp_path):
    data = np.zeros((11, 11), np.uint8)
    data[2:9, 2:9] = 1  # a ring of forest ...
    data[4:7, 4:7] = 0  # ... around a hole of water ...
    data[5, 5] = 2  # ... with an island of crop in it
    src = class_map(tmp_path / "r.tif", data)
    df = read(vectorize_class_map(src, options=VectorOptions(strip_pixels=2 * 11)).path).sort_values("pixels")
    assert df.class_name.tolist() == ["crop", "water", "forest", "water"]
    assert df.pixels.tolist() == [1, 8, 40, 72]
    ring = df.geometry[df.class_name == "forest"].iloc[0]
    outer_water = df.geometry[df.pixels == 72].iloc[0]
    assert len(ring.interiors) == 1 and len(outer_water.interiors) == 1
    assert shapely.union_all(df.geometry.values).equals(shapely.box(*rasterio.transform.array_bounds(11, 11, TRANSFORM)))


def test_a_one_pixel_diagonal_connection_makes_two_regions(tmp_path):
    """4-connectivity: pixels that touch only at a corner are two regions (as gdal_polygonize's default)."""
    data = np.full((4, 4), NODATA, np.uint8)
    data[1, 1] = data[2, 2] = 1
    src = class_map(tmp_path / "d.tif", data)
    df = read(vectorize_class_map(src, options=VectorOptions(strip_pixels=4 * 2)).path)
    assert df.pixels.tolist() == [1, 1] and df.class_name.tolist() == ["forest", "forest"]


@pytest.mark.parametrize("min_area", [2, 5, 12])
def test_min_area_equals_rasterio_sieve_on_the_whole_map(tmp_path, min_area):
    data = blocky(3, shape=(120, 30), cell=4)
    src = class_map(tmp_path / "s.tif", data)
    keep = data != NODATA
    sieved = rasterio.features.sieve(data, min_area, mask=keep, connectivity=4)
    options = VectorOptions(min_area=min_area, strip_pixels=8 * 30)  # strips of 32 rows (the least when sieving) and halos
    df = read(vectorize_class_map(src, options=options).path)
    assert_same_regions(df, whole_map_regions(sieved, keep), keep, sieved)
    # what is left of a small region touches nodata only (gdal_sieve leaves those)
    assert df.pixels.min() >= 1


def test_simplify_keeps_shared_edges(tmp_path):
    data = blocky(5, shape=(40, 40), cell=5, nodata_fraction=0)
    src = class_map(tmp_path / "p.tif", data)
    plain = read(vectorize_class_map(src, options=VectorOptions()).path)
    simple = read(vectorize_class_map(src, tmp_path / "simple.gpkg", VectorOptions(simplify=1.5, strip_pixels=7 * 40)).path)
    assert len(simple) == len(plain) and simple.geometry.is_valid.all()
    assert shapely.get_num_coordinates(simple.geometry.values).sum() < shapely.get_num_coordinates(plain.geometry.values).sum()
    union = shapely.union_all(simple.geometry.values)
    # no gaps: the union is the map's footprint; no overlaps: the areas add up to it
    assert union.symmetric_difference(shapely.union_all(plain.geometry.values)).area < 1e-6
    assert simple.area.sum() == pytest.approx(union.area)
    assert len(shapely.get_parts(union)) == 1 and not shapely.Polygon(union.exterior).difference(union).area


@pytest.mark.parametrize("fmt", ["gpkg", "fgb", "geojson", "parquet"])
def test_every_format_reads_back_with_its_crs_and_attributes(tmp_path, fmt):
    data = np.zeros((6, 8), np.uint8)
    data[:, 4:] = 3
    data[0, 0] = NODATA
    conf = np.where(data == 3, 204, 102).astype(np.uint8)
    src = class_map(tmp_path / "f_classes.tif", data)
    confidence = write_tif(tmp_path / "f_confidence.tif", conf, transform=TRANSFORM)
    path = vectorize_class_map(src, options=VectorOptions(format=fmt), confidence=confidence).path
    assert path == tmp_path / f"f_classes.{fmt}"
    df = read(path).sort_values("class_id")
    assert df.crs.to_epsg() == 32633
    assert df.columns.tolist() == ["class_id", "class_name", "area", "pixels", "confidence", "geometry"]
    assert df.class_name.tolist() == ["water", "urban"] and df.pixels.tolist() == [23, 24]
    assert df.area.tolist() == [2300.0, 2400.0]
    assert df.confidence.tolist() == pytest.approx([0.4, 0.8])
    if fmt != "parquet":
        assert pyogrio.read_info(path)["crs"] == "EPSG:32633"


def test_confidence_is_null_without_a_raster_and_the_mean_of_the_probabilities_maximum(tmp_path):
    data = np.zeros((4, 4), np.uint8)
    src = class_map(tmp_path / "c.tif", data, names=None)
    df = read(vectorize_class_map(src).path)
    assert df.class_name.tolist() == ["class_0"] and df.confidence.isna().all()
    probs = np.stack([np.full((4, 4), 51), np.full((4, 4), 153)]).astype(np.uint8)
    probs[0, 0, 0] = 255
    probs_path = write_tif(tmp_path / "c_probs.tif", probs, transform=TRANSFORM)
    df = read(vectorize_class_map(src, tmp_path / "p.gpkg", confidence=probs_path).path)
    assert df.confidence.iloc[0] == pytest.approx((255 + 15 * 153) / 255 / 16)


def test_classes_keep_a_subset_and_nodata_is_never_polygonized(tmp_path):
    data = blocky(11)
    src = class_map(tmp_path / "k.tif", data)
    df = read(vectorize_class_map(src, options=VectorOptions(classes=parse_classes("1,3"), strip_pixels=5 * 45)).path)
    assert set(df.class_id) == {1, 3}
    keep = np.isin(data, [1, 3])
    assert_same_regions(df, whole_map_regions(data, keep), keep, data)
    nodata = footprint(data == NODATA)
    assert shapely.union_all(df.geometry.values).intersection(nodata).area == 0


def test_a_map_of_nodata_writes_an_empty_layer(tmp_path):
    src = class_map(tmp_path / "e.tif", np.full((5, 5), NODATA, np.uint8))
    summary = vectorize_class_map(src, options=VectorOptions(format="fgb"))
    assert summary.polygons == 0 and len(read(summary.path)) == 0


def test_a_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    src = class_map(tmp_path / "x.tif", blocky(2))
    calls = []
    original = vectorfile.VectorFileWriter.write

    def failing(self, geometry, columns):
        calls.append(len(geometry))
        if len(calls) == 2:
            raise OSError("disk full")
        original(self, geometry, columns)

    monkeypatch.setattr(vectorfile.VectorFileWriter, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        vectorize_class_map(src, options=VectorOptions(batch_polygons=10, strip_pixels=45))
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tif"]


def test_bad_inputs_are_one_line_errors(tmp_path):
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    with pytest.raises(RasterReadError, match="notes.tif: not a readable raster"):
        vectorize_class_map(text)
    two = write_tif(tmp_path / "two.tif", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(BandMismatchError, match=r"two.tif: a class map has one band \(found 2\)"):
        vectorize_class_map(two)
    floats = write_tif(tmp_path / "f.tif", np.zeros((4, 4), np.float32))
    with pytest.raises(BandMismatchError, match=r"a class map holds integer class ids \(found float32\)"):
        vectorize_class_map(floats)
    src = class_map(tmp_path / "m.tif", np.zeros((4, 4), np.uint8))
    other = write_tif(tmp_path / "conf.tif", np.zeros((5, 4), np.uint8))
    with pytest.raises(RasterMismatchError, match="conf.tif: the confidence raster is not on the class map's grid"):
        vectorize_class_map(src, confidence=other)
    with pytest.raises(ConfigError, match=r"unknown vector format 'shp' \(expected gpkg, fgb, geojson or parquet\)"):
        VectorOptions(format="shp")
    with pytest.raises(ConfigError, match="--classes expects class ids such as 1,3"):
        parse_classes("forest")
    vectorize_class_map(src)
    with pytest.raises(OutputExistsError, match="m.gpkg: output exists"):
        vectorize_class_map(src)
    for message in ("notes.tif: not a readable raster",):
        assert "\n" not in message


def test_vector_path_is_beside_the_class_map_or_in_the_folder_given(tmp_path):
    assert vector_path(tmp_path / "a_classes.tif", "parquet") == tmp_path / "a_classes.parquet"
    assert vector_path("x/a_classes.tif", "fgb", tmp_path) == tmp_path / "a_classes.fgb"
