"""Labels as they come: other grids and CRSs, mosaics, vectors, label maps; all aligned onto the image grid."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.warp import reproject, transform_bounds

from geobp.data import alignment as alignment_module
from geobp.data.alignment import align_labels, aligned_labels, find_labelled_scenes
from geobp.data.labels import LabelOptions, find_label_sources, map_values
from geobp.errors import ConfigError, LabelError
from geobp.raster import read_info
from tests.conftest import write_tif

IMAGE_CRS = "EPSG:32633"
OPTIONS = LabelOptions(num_classes=3)


def write_image(path: Path, origin=(500000.0, 5000000.0), size=64, res=10.0, crs=IMAGE_CRS, bands=3, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(100, 1000, (bands, size, size)).astype(np.uint16)
    return write_tif(path, data, crs=crs, transform=from_origin(origin[0], origin[1], res, res), nodata=0)


def labels_around(image: Path, crs: str, res: float, classes: int = 3, margin: float = 0.2, seed: int = 1) -> tuple[np.ndarray, object]:
    """Random class blocks on a grid in ``crs`` at ``res`` covering the image with a margin; (labels, transform)."""
    info = read_info(image)
    with rasterio.open(image) as src:
        l, b, r, t = transform_bounds(src.crs, CRS.from_user_input(crs), *src.bounds)
    dx, dy = (r - l) * margin, (t - b) * margin
    w, h = int(np.ceil((r - l + 2 * dx) / res)), int(np.ceil((t - b + 2 * dy) / res))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, (h, w)).astype(np.uint8)
    assert info.crs
    return labels, from_origin(l - dx, t + dy, res, res)


def nearest(labels: np.ndarray, src_transform, src_crs: str, image: Path, nodata: int = 255) -> np.ndarray:
    """The reference: rasterio.warp.reproject of the whole label raster with nearest resampling."""
    info = read_info(image)
    out = np.full(info.shape, nodata, np.uint8)
    reproject(labels, out, src_transform=src_transform, src_crs=src_crs, src_nodata=nodata,
              dst_transform=rasterio.Affine(*info.transform), dst_crs=info.crs, dst_nodata=nodata,
              resampling=Resampling.nearest)
    return out


@pytest.mark.parametrize("crs,res,strip", [("EPSG:4326", 0.0003, 2**24), ("EPSG:3035", 30.0, 2**24), ("EPSG:3035", 30.0, 16 * 64)])
def test_labels_in_another_crs_equal_nearest_reproject(tmp_path, monkeypatch, crs, res, strip):
    monkeypatch.setattr(alignment_module, "ALIGN_STRIP_PIXELS", strip)  # 16 rows of 64 px: aligned and written in 4 strips
    image = write_image(tmp_path / "img" / "a.tif")
    labels, transform = labels_around(image, crs, res)
    lab = write_tif(tmp_path / "lab" / "map.tif", labels, crs=crs, transform=transform, block=None)
    sources = find_label_sources(lab)
    mask, report = aligned_labels(read_info(image), sources, OPTIONS, tmp_path / "img")
    assert mask is not None
    with rasterio.open(mask.path) as src:
        aligned = src.read(1)
        assert src.crs == CRS.from_user_input(IMAGE_CRS) and src.transform == rasterio.Affine(*read_info(image).transform)
        assert src.profile["tiled"] and src.block_shapes[0] == (16, 16)  # the image's blocks
    np.testing.assert_array_equal(aligned, nearest(labels, transform, crs, image))
    assert report.coverage == 1.0 and report.method == ["nearest"]
    assert report.source_crs == [crs] and report.image_res == (10.0, 10.0)
    assert report.histogram == np.bincount(aligned.ravel(), minlength=3)[:3].tolist()
    assert Path(mask.path).parent == tmp_path / "img" / ".geobp_cache" / "labels"


def test_much_finer_labels_take_the_mode(tmp_path):
    image = write_image(tmp_path / "a.tif", size=16, res=30.0)
    # 3 m labels: each 30 m image pixel holds 10 x 10 label pixels, 70 of class 2 and 30 of class 1
    labels = np.ones((160, 160), np.uint8)
    for i in range(16):
        labels[i * 10 : i * 10 + 7] = 2
    lab = write_tif(tmp_path / "fine.tif", labels, transform=from_origin(500000.0, 5000000.0, 3.0, 3.0))
    out, report = align_labels(read_info(image), find_label_sources(lab), OPTIONS)
    assert report.method == ["mode"]
    assert (out == 2).all()


def test_mosaic_of_four_label_tiles_covers_two_images(tmp_path):
    a = write_image(tmp_path / "img" / "a.tif", origin=(500000.0, 5000000.0))
    b = write_image(tmp_path / "img" / "b.tif", origin=(500640.0, 5000000.0), seed=1)
    # one 3035 label map over both images, cut into four tiles (quadrants)
    with rasterio.open(a) as sa, rasterio.open(b) as sb:
        l, bt, r, t = transform_bounds(sa.crs, "EPSG:3035", sa.bounds.left, sb.bounds.bottom, sb.bounds.right, sa.bounds.top)
    res = 30.0
    w, h = int((r - l) / res) + 8, int((t - bt) / res) + 8
    full = np.random.default_rng(2).integers(0, 3, (h, w)).astype(np.uint8)
    origin = (l - 4 * res, t + 4 * res)
    tiles = []
    for i, (r0, c0) in enumerate([(0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)]):
        part = full[r0 : r0 + (h // 2 if r0 == 0 else h - h // 2), c0 : c0 + (w // 2 if c0 == 0 else w - w // 2)]
        tf = from_origin(origin[0] + c0 * res, origin[1] - r0 * res, res, res)
        tiles.append(write_tif(tmp_path / "labels" / f"tile{i}.tif", part, crs="EPSG:3035", transform=tf, block=None))
    # a fifth tile far away pairs with no image
    write_tif(tmp_path / "labels" / "far.tif", full[:8, :8], crs="EPSG:3035", transform=from_origin(4e6, 3e6, res, res), block=None)
    full_tf = from_origin(origin[0], origin[1], res, res)
    scenes, reports = find_labelled_scenes(tmp_path / "img", tmp_path / "labels", OPTIONS)
    assert [s.name for s in scenes] == ["a", "b"]
    for scene, report, image in zip(scenes, reports, (a, b)):
        with rasterio.open(scene.mask.path) as src:
            np.testing.assert_array_equal(src.read(1), nearest(full, full_tf, "EPSG:3035", image))
        assert len(report.sources) >= 2 and all("tile" in s for s in report.sources)
        assert report.coverage == 1.0


def test_vector_labels_in_3857_with_class_names(tmp_path):
    geopandas = pytest.importorskip("geopandas")
    from shapely.geometry import box

    image = write_image(tmp_path / "img" / "a.tif")  # 500000..500640 E, 4999360..5000000 N
    x0, y1 = 500000.0, 5000000.0
    polys = [box(x0 + 100, y1 - 300, x0 + 300, y1 - 100), box(x0 + 400, y1 - 600, x0 + 600, y1 - 400), box(x0 + 20, y1 - 620, x0 + 24, y1 - 350)]
    frame = geopandas.GeoDataFrame({"cover": ["water", "forest", "forest"]}, geometry=polys, crs=IMAGE_CRS).to_crs("EPSG:3857")
    gpkg = tmp_path / "labels.gpkg"
    frame.to_file(gpkg, driver="GPKG")
    options = LabelOptions(num_classes=3, class_names=("background", "water", "forest"), label_field="cover", label_background=0)
    out, report = align_labels(read_info(image), find_label_sources(gpkg, "cover"), options)
    # pixel centres (row, col) well inside each polygon, and outside all of them
    assert out[20, 20] == 1 and out[50, 50] == 2 and out[5, 60] == 0
    assert report.sources == [str(gpkg)] and report.method == ["rasterize"]
    assert report.source_crs[0].endswith("3857") or "Pseudo-Mercator" in report.source_crs[0]
    # the thin strip (4 m wide, under half a 10 m pixel) shows only with all_touched
    thin_plain = int((out[:, 2] == 2).sum())
    touched, _ = align_labels(read_info(image), find_label_sources(gpkg, "cover"),
                              LabelOptions(**{**options.__dict__, "all_touched": True}))
    assert thin_plain == 0 and (touched[:, 2] == 2).sum() > 20
    # without a background, pixels outside every polygon are ignored
    ignored, _ = align_labels(read_info(image), find_label_sources(gpkg, "cover"),
                              LabelOptions(num_classes=3, class_names=("background", "water", "forest"), label_field="cover"))
    assert ignored[5, 60] == 255 and ignored[20, 20] == 1


def test_vector_names_not_in_class_names_are_an_error(tmp_path):
    geopandas = pytest.importorskip("geopandas")
    from shapely.geometry import box

    image = write_image(tmp_path / "img" / "a.tif")
    frame = geopandas.GeoDataFrame({"cover": ["water", "lava"]}, geometry=[box(500100, 4999700, 500300, 4999900)] * 2, crs=IMAGE_CRS)
    frame.to_file(tmp_path / "v.geojson", driver="GeoJSON")
    options = LabelOptions(num_classes=3, class_names=("bg", "water", "forest"), label_field="cover")
    with pytest.raises(LabelError, match=r"v.geojson: label values \[lava\] are neither in data.label_map.*Fix: map them"):
        aligned_labels(read_info(image), find_label_sources(tmp_path / "v.geojson"), options, tmp_path)
    with pytest.raises(ConfigError, match=r"v.geojson: attribute 'kind' not found \(attributes: cover\)"):
        find_label_sources(tmp_path / "v.geojson", "kind")


def test_vector_with_no_feature_over_the_image_warns_and_ignores_all(tmp_path):
    geopandas = pytest.importorskip("geopandas")
    from shapely.geometry import box

    image = write_image(tmp_path / "img" / "a.tif")
    far = geopandas.GeoDataFrame({"c": [1]}, geometry=[box(600000, 4000000, 600100, 4000100)], crs=IMAGE_CRS)
    far.to_file(tmp_path / "far.gpkg", driver="GPKG")
    with pytest.warns(UserWarning, match=r"far.gpkg: no feature over image .*a.tif: all its pixels are ignored"):
        out, report = align_labels(read_info(image), find_label_sources(tmp_path / "far.gpkg", "c"),
                                   LabelOptions(num_classes=3, label_field="c", label_background=0))
    assert (out == 255).all() and report.coverage == 0 and report.sources == []


def sen1floods11(tmp_path: Path, names=("Bolivia_1", "Bolivia_2")) -> tuple[Path, Path]:
    """Chips laid out as Sen1Floods11 publishes them: EPSG:4326, int16 labels -1/0/1, no nodata tag,
    label transforms a few 1e-19 degrees off the images'."""
    res = 8.983152841195214e-05
    for i, name in enumerate(names):
        west = -66.0 + i * 32 * res  # adjacent chips share an edge
        rng = np.random.default_rng(i)
        img = rng.integers(0, 3000, (4, 32, 32)).astype(np.uint16)
        write_tif(tmp_path / "S2Hand" / f"{name}_S2Hand.tif", img, crs="EPSG:4326", transform=from_origin(west, -14.0, res, res))
        lab = rng.integers(-1, 2, (32, 32)).astype(np.int16)
        tf = from_origin(west + 3e-19, -14.0 - 2e-19, res, res)
        write_tif(tmp_path / "LabelHand" / f"{name}_LabelHand.tif", lab, crs="EPSG:4326", transform=tf)
    return tmp_path / "S2Hand", tmp_path / "LabelHand"


def test_sen1floods11_as_published_pairs_by_footprint_and_maps_minus_one(tmp_path):
    images, labels = sen1floods11(tmp_path)
    options = LabelOptions(num_classes=2, label_map={-1: 255})
    scenes, reports = find_labelled_scenes(str(images / "*_S2Hand.tif"), str(labels / "*.tif"), options)
    assert [s.name for s in scenes] == ["Bolivia_1_S2Hand", "Bolivia_2_S2Hand"]
    for i, (scene, report) in enumerate(zip(scenes, reports)):
        assert report.method == ["copy"]  # the same grid within tolerance: no warp
        assert report.sources == [str(labels / f"Bolivia_{i + 1}_LabelHand.tif")]  # the neighbour does not pair
        with rasterio.open(labels / f"Bolivia_{i + 1}_LabelHand.tif") as src:
            raw = src.read(1)
        with rasterio.open(scene.mask.path) as src:
            np.testing.assert_array_equal(src.read(1), np.where(raw == -1, 255, raw).astype(np.uint8))
        assert report.unmapped == []


def test_unmapped_values_are_a_one_line_error_naming_file_and_values(tmp_path):
    images, labels = sen1floods11(tmp_path, names=("Chip",))
    with pytest.raises(LabelError, match=r"Chip_LabelHand.tif: label values \[-1\] are neither in data.label_map nor class ids 0..1 "
                                         r"\(or the ignore index 255\)\. Fix: map them in data.label_map \(e.g. \{-1: 255\}"):
        find_labelled_scenes(images, labels, LabelOptions(num_classes=2))
    # an NLCD-style map: codes mapped, one code forgotten
    codes = np.array([[11, 21], [41, 95]], np.uint8).repeat(32, 0).repeat(32, 1)
    write_tif(tmp_path / "nlcd.tif", codes, transform=from_origin(500000.0, 5000000.0, 10.0, 10.0))
    write_image(tmp_path / "img" / "x.tif")
    options = LabelOptions(num_classes=3, label_map={11: 0, 21: 1, 41: 2})
    with pytest.raises(LabelError, match=r"nlcd.tif: label values \[95\] are neither"):
        find_labelled_scenes(tmp_path / "img", tmp_path / "nlcd.tif", options)
    # check mode reports them instead
    mask, report = aligned_labels(read_info(tmp_path / "img" / "x.tif"), find_label_sources(tmp_path / "nlcd.tif"),
                                  options, tmp_path, strict=False)
    assert mask is None and report.unmapped == ["95"]


def test_label_map_validation_and_value_mapping():
    with pytest.raises(ConfigError, match=r"data.label_map maps \{7: 9\} to values that are neither class ids 0..2"):
        LabelOptions(num_classes=3, label_map={7: 9})
    with pytest.raises(ConfigError, match=r"data.label_background 4 is neither a class id"):
        LabelOptions(num_classes=3, label_background=4)
    raw = np.array([[-1, 0, 1], [2, 7, -9999]], np.int16)
    out, bad = map_values(raw, nodata=-9999, options=LabelOptions(num_classes=3, label_map={-1: 255, 7: 2}))
    np.testing.assert_array_equal(out, [[255, 0, 1], [2, 2, 255]])
    assert bad == []
    # names as keys (vector attributes), and numbers written as strings in a YAML/JSON map
    named = LabelOptions(num_classes=3, class_names=("bg", "house", "road"), label_map={"building": 1, "7": 2})
    assert (named.lookup("building"), named.lookup("road"), named.lookup(7), named.lookup("7"), named.lookup("tree")) == (1, 2, 2, 2, None)
    floats = np.array([[0.0, 1.0], [np.nan, 2.5]], np.float32)
    out, bad = map_values(floats, None, LabelOptions(num_classes=3))
    np.testing.assert_array_equal(out, [[0, 1], [255, 255]])
    assert bad == ["2.5"]


def test_cache_is_rebuilt_when_a_label_file_changes(tmp_path):
    image = write_image(tmp_path / "img" / "a.tif")
    labels, transform = labels_around(image, "EPSG:3035", 30.0)
    lab = write_tif(tmp_path / "map.tif", labels, crs="EPSG:3035", transform=transform, block=None)
    info = read_info(image)
    first, _ = aligned_labels(info, find_label_sources(lab), OPTIONS, tmp_path)
    again, _ = aligned_labels(info, find_label_sources(lab), OPTIONS, tmp_path)
    assert first is not None and again is not None and first.path == again.path
    stamp = os.stat(first.path).st_mtime_ns
    again, _ = aligned_labels(info, find_label_sources(lab), OPTIONS, tmp_path)
    assert os.stat(again.path).st_mtime_ns == stamp  # read from the cache, not rewritten
    write_tif(lab, (labels + 1) % 3, crs="EPSG:3035", transform=transform, block=None)
    st = os.stat(lab)
    os.utime(lab, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    changed, _ = aligned_labels(info, find_label_sources(lab), OPTIONS, tmp_path)
    assert changed is not None and changed.path != first.path
    with rasterio.open(changed.path) as src:
        np.testing.assert_array_equal(src.read(1), nearest((labels + 1) % 3, transform, "EPSG:3035", image))
    # other options give another entry too
    mapped, _ = aligned_labels(info, find_label_sources(lab), LabelOptions(num_classes=3, label_map={0: 255}), tmp_path)
    assert mapped is not None and mapped.path not in (first.path, changed.path)


def test_scene_without_any_label_is_left_out_with_a_warning(tmp_path):
    write_image(tmp_path / "img" / "a.tif")
    write_image(tmp_path / "img" / "far.tif", origin=(700000.0, 5000000.0))
    labels = np.zeros((64, 64), np.uint8)
    write_tif(tmp_path / "lab.tif", labels, transform=from_origin(500000.0, 5000000.0, 10.0, 10.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scenes, _ = find_labelled_scenes(tmp_path / "img", tmp_path / "lab.tif", OPTIONS)
    assert [s.name for s in scenes] == ["a"]
    assert any("far.tif: no label covers this image: the scene is left out" in str(w.message) for w in caught)


def test_continental_map_is_paired_and_only_a_window_of_it_is_read(tmp_path, monkeypatch):
    """A coarse EPSG:4326 map over much of Europe: footprints are compared in the map's CRS, and only the
    few map pixels over the image are read."""
    image = write_image(tmp_path / "img" / "a.tif")  # near 15 E, 45 N
    res = 0.05
    codes = np.random.default_rng(5).integers(0, 3, (int(30 / res), int(60 / res))).astype(np.uint8)  # 30..60 N, -20..40 E
    transform = from_origin(-20.0, 60.0, res, res)
    lab = write_tif(tmp_path / "europe.tif", codes, crs="EPSG:4326", transform=transform, block=256)
    reads = []
    original = rasterio.io.DatasetReader.read

    def counting(self, *args, **kwargs):
        reads.append(kwargs.get("window"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", counting)
    out, report = align_labels(read_info(image), find_label_sources(lab), OPTIONS)
    monkeypatch.undo()
    np.testing.assert_array_equal(out, nearest(codes, transform, "EPSG:4326", image))
    assert report.coverage == 1.0 and report.sources == [str(lab)]
    assert reads and all(w is not None and w.width * w.height <= 36 for w in reads)  # 6 x 6 (with the margin), not 600 x 1200


def test_processes_of_a_node_split_the_alignments(tmp_path, monkeypatch):
    a, b = write_image(tmp_path / "img" / "a.tif"), write_image(tmp_path / "img" / "b.tif", seed=1)
    labels, transform = labels_around(a, "EPSG:3035", 30.0)
    lab = write_tif(tmp_path / "map.tif", labels, crs="EPSG:3035", transform=transform, block=None)
    sources = find_label_sources(lab)
    # the other process (local rank 0 of 2) has aligned its scene, a
    done, _ = aligned_labels(read_info(a), sources, OPTIONS, tmp_path / "img")
    stamp = os.stat(done.path).st_mtime_ns
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    aligned = []
    real = alignment_module.Alignment
    monkeypatch.setattr(alignment_module, "Alignment", lambda image, *args: aligned.append(Path(image.path).name) or real(image, *args))
    scenes, _ = find_labelled_scenes(tmp_path / "img", lab, OPTIONS)
    assert aligned == ["b.tif"] and [s.name for s in scenes] == ["a", "b"]  # its own scene only, scenes in order
    assert scenes[0].mask.path == done.path and os.stat(done.path).st_mtime_ns == stamp


def test_a_waiting_process_gets_the_owners_result_or_its_error(tmp_path):
    import threading

    image = read_info(write_image(tmp_path / "img" / "a.tif"))
    labels, transform = labels_around(tmp_path / "img" / "a.tif", "EPSG:3035", 30.0)
    sources = find_label_sources(write_tif(tmp_path / "map.tif", labels, crs="EPSG:3035", transform=transform, block=None))
    got = {}
    waiter = threading.Thread(target=lambda: got.update(w=aligned_labels(image, sources, OPTIONS, tmp_path, owner=False)))
    waiter.start()
    owner, _ = aligned_labels(image, sources, OPTIONS, tmp_path, owner=True)
    waiter.join(timeout=60)
    assert got["w"][0].path == owner.path
    # unmapped values: the owner's failure is cached as its report, and a waiter raises the same error at once
    bad = LabelOptions(num_classes=2)  # class 2 is out of range
    with pytest.raises(LabelError, match=r"label values \[2\]") as first:
        aligned_labels(image, sources, bad, tmp_path / "c", owner=True)
    with pytest.raises(LabelError) as second:
        aligned_labels(image, sources, bad, tmp_path / "c", owner=False)
    assert str(second.value) == str(first.value)
