"""Tests for geobp.data.synth: scene content, GeoTIFF layout, determinism, argument checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from geobp.data.synth import CLASS_NAMES, NODATA, band_names, make_scene, write_scenes
from geobp.errors import ConfigError


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("synth")
    paths = write_scenes(out, scenes=3, size=256, bands=6, classes=5, seed=7, block_size=128)
    return out, paths


def test_files_layout(written: tuple[Path, list[Path]]) -> None:
    out, paths = written
    assert [p.name for p in paths] == ["scene_000.tif", "scene_001.tif", "scene_002.tif"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [p.name for p in paths]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [p.name for p in paths]  # no temp files
    origins = []
    for path in paths:
        with rasterio.open(path) as img, rasterio.open(out / "masks" / path.name) as msk:
            assert (img.count, img.height, img.width) == (6, 256, 256)
            assert img.dtypes == ("uint16",) * 6
            assert img.crs.to_epsg() == 32633 and msk.crs == img.crs
            assert img.transform.a == 10.0 and img.transform.e == -10.0 and img.transform.b == 0.0
            assert msk.transform == img.transform and msk.shape == img.shape
            assert img.block_shapes == [(128, 128)] * 6 and msk.block_shapes == [(128, 128)]
            assert img.compression.value == "DEFLATE" and msk.compression.value == "DEFLATE"
            assert img.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == "2"
            assert img.nodata == 0 and msk.nodata is None
            assert list(img.descriptions) == band_names(6) == ["blue", "green", "red", "nir", "swir1", "swir2"]
            assert msk.count == 1 and msk.dtypes == ("uint8",)
            assert msk.tags()["CLASS_NAMES"] == ",".join(CLASS_NAMES[:5])
            values = np.unique(msk.read(1))
            assert set(values.tolist()) <= set(range(5)) | {255}
            origins.append((img.transform.c, img.transform.f))
    assert origins == [(400000.0 + i * 2560.0, 5500000.0) for i in range(3)]


def test_nodata_border_on_odd_scenes(written: tuple[Path, list[Path]]) -> None:
    out, paths = written
    for i, path in enumerate(paths):
        with rasterio.open(path) as img, rasterio.open(out / "masks" / path.name) as msk:
            image, mask = img.read(), msk.read(1)
        empty = (image == 0).all(axis=0)
        assert np.array_equal(empty, mask == 255)
        if i % 2 == 1:
            assert 0.08 <= empty.mean() <= 0.22
        else:
            assert not empty.any()


def test_write_is_deterministic(tmp_path: Path, written: tuple[Path, list[Path]]) -> None:
    _, first = written
    second = write_scenes(tmp_path, scenes=2, size=256, bands=6, classes=5, seed=7, block_size=128)
    for a, b in zip(first, second):
        with rasterio.open(a) as ra, rasterio.open(b) as rb:
            assert np.array_equal(ra.read(), rb.read())


def test_make_scene_deterministic_and_seeded() -> None:
    a_img, a_mask = make_scene(64, 4, 3, seed=1)
    b_img, b_mask = make_scene(64, 4, 3, seed=1)
    c_img, _ = make_scene(64, 4, 3, seed=2)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("classes", [1, 5, 8])
def test_every_class_present(classes: int) -> None:
    for seed in range(3):
        _, mask = make_scene(256, 6, classes, seed=seed, nodata_border=20)
        counts = np.bincount(mask.ravel(), minlength=256)
        assert (counts[:classes] / mask.size >= 0.03).all()
        assert counts[classes:255].sum() == 0


def test_regions_are_spatially_coherent() -> None:
    _, mask = make_scene(512, 6, 5, seed=3)
    same_as_right = (mask[:, 1:] == mask[:, :-1]).mean()
    assert same_as_right > 0.85
    per_tile = [len(np.unique(mask[y:y + 128, x:x + 128])) for y in range(0, 512, 128) for x in range(0, 512, 128)]
    assert min(per_tile) >= 2


@pytest.mark.parametrize(("dtype", "low", "high"), [("uint8", 1, 255), ("uint16", 1, 10000),
                                                    ("int16", 1, 10000), ("float32", 0.0, 1.0)])
def test_dtype_scaling_and_nodata(dtype: str, low: float, high: float) -> None:
    image, mask = make_scene(64, 3, 4, seed=0, dtype=dtype, nodata_border=15)  # type: ignore[arg-type]
    assert image.dtype == np.dtype(dtype)
    valid = image[:, mask != 255]
    assert valid.min() >= low and valid.max() <= high
    assert (image[:, mask == 255] == NODATA[dtype]).all()


def test_float32_writes_nodata_tag(tmp_path: Path) -> None:
    [path] = write_scenes(tmp_path, scenes=1, size=48, bands=2, classes=2, dtype="float32", block_size=256,
                          progress=True)
    with rasterio.open(path) as img:
        assert img.nodata == -9999.0 and img.dtypes == ("float32", "float32")
        assert img.block_shapes == [(48, 48)] * 2
        assert list(img.descriptions) == ["B1", "B2"]


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_open(path: Path, mode: str, **profile: object) -> None:
        Path(path).write_bytes(b"II*\x00partial")
        raise OSError("disk full")

    monkeypatch.setattr(rasterio, "open", failing_open)
    with pytest.raises(OSError, match="disk full"):
        write_scenes(tmp_path, scenes=1, size=32)
    assert list((tmp_path / "images").iterdir()) == []


def test_spectrally_separable() -> None:
    train_img, train_mask = make_scene(256, 6, 8, seed=10)
    test_img, test_mask = make_scene(256, 6, 8, seed=11, nodata_border=15)
    x, y = train_img.reshape(6, -1).T.astype(np.float64), train_mask.ravel()
    means = np.stack([x[y == k].mean(axis=0) for k in range(8)])
    keep = test_mask.ravel() != 255
    xt, yt = test_img.reshape(6, -1).T[keep].astype(np.float64), test_mask.ravel()[keep]
    pred = np.argmin(((xt[:, None, :] - means[None]) ** 2).sum(axis=-1), axis=1)
    assert (pred == yt).mean() > 0.9


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": 8}, "size must be at least 16"),
    ({"bands": 0}, "bands must be at least 1"),
    ({"classes": 0}, r"classes must be in 1\.\.8"),
    ({"classes": 9}, r"classes must be in 1\.\.8 \(found 9\)"),
    ({"dtype": "int32"}, "dtype must be one of uint8, uint16, int16, float32"),
    ({"nodata_border": 60}, "nodata_border must be a percent"),
])
def test_make_scene_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"size": 32, "bands": 3, "classes": 3, **kwargs}
    with pytest.raises(ConfigError, match=match):
        make_scene(args.pop("size"), args.pop("bands"), args.pop("classes"), seed=0, **args)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"block_size": 100}, "block_size must be a positive multiple of 16"),
    ({"crs": "EPSG:4326"}, "crs must be projected"),
    ({"crs": "not-a-crs"}, "is not a valid CRS"),
    ({"pixel_size": 0.0}, "pixel_size must be positive"),
    ({"size": 4}, "size must be at least 16"),
])
def test_write_scenes_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        write_scenes(tmp_path, **{"scenes": 1, "size": 32, **kwargs})
