"""`geobp vectorize` and `geobp infer --vector`: end to end through main(), one-line errors."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio

from geobp.cli import main
from tests.conftest import save_untrained_checkpoint, write_tif

PRE = {"bands": [1, 2, 3], "nodata": 0, "method": "meanstd", "mean": [300.0] * 3, "std": [100.0] * 3, "low": [], "high": []}
NAMES = ["water", "forest", "urban"]


@pytest.fixture
def classes_tif(tmp_path: Path) -> Path:
    data = np.zeros((12, 10), np.uint8)
    data[:, 5:] = 1
    data[4:6, 1:3] = 2
    data[0, 0] = 255
    path = write_tif(tmp_path / "maps" / "a_classes.tif", data, nodata=255)
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(CLASS_NAMES=",".join(NAMES))
    return path


def error_of(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_vectorize_writes_the_chosen_format_into_out(tmp_path, classes_tif, capsys):
    assert main(["vectorize", str(classes_tif), "--vector", "parquet", "--out", str(tmp_path / "v"), "--classes", "1,2"]) == 0
    df = gpd.read_parquet(tmp_path / "v" / "a_classes.parquet")
    assert sorted(df.class_name) == ["forest", "urban"] and df.crs.to_epsg() == 32633
    assert "a_classes.parquet (2 polygons)" in capsys.readouterr().err


def test_vectorize_defaults_to_a_geopackage_beside_the_map_with_confidence(tmp_path, classes_tif):
    conf = write_tif(tmp_path / "conf.tif", np.full((12, 10), 255, np.uint8))
    assert main(["vectorize", str(classes_tif), "--confidence", str(conf), "--min_area", "3", "--simplify", "1"]) == 0
    df = gpd.read_file(classes_tif.with_suffix(".gpkg"))
    assert sorted(df.class_name) == ["forest", "urban", "water"]  # the 4-pixel urban island is kept (min_area 3) ...
    assert (df.confidence == 1).all()
    assert main(["vectorize", str(classes_tif), "--min_area", "5", "--overwrite"]) == 0
    df = gpd.read_file(classes_tif.with_suffix(".gpkg"))
    assert sorted(df.class_name) == ["forest", "water"] and df.confidence.isna().all()  # ... and merged into water at 5


def test_vectorize_bad_inputs_are_one_line_errors(tmp_path, classes_tif, capsys):
    text = tmp_path / "notes.tif"
    text.write_text("hello")
    assert main(["vectorize", str(text)]) == 2
    assert "notes.tif: not a readable raster" in error_of(capsys)
    two = write_tif(tmp_path / "two.tif", np.zeros((2, 4, 4), np.uint8))
    assert main(["vectorize", str(two)]) == 2
    assert "two.tif: a class map has one band (found 2). Fix:" in error_of(capsys)
    with pytest.raises(SystemExit) as stop:
        main(["vectorize", str(classes_tif), "--vector", "shp"])
    assert stop.value.code == 2 and "argument --vector: invalid choice: 'shp'" in capsys.readouterr().err
    assert main(["vectorize", str(classes_tif), "--classes", "forest"]) == 2
    assert "--classes expects class ids such as 1,3 (found 'forest')" in error_of(capsys)


@pytest.mark.slow
def test_infer_with_vector_writes_polygons_beside_each_class_map(tmp_path, make_scene, capsys):
    ckpt = save_untrained_checkpoint(tmp_path / "model.ckpt", PRE, NAMES)
    a, _ = make_scene("a", size=(40, 48), root=tmp_path / "d")
    b, _ = make_scene("b", size=(30, 30), root=tmp_path / "d", seed=1)
    out = tmp_path / "out"
    code = main(["infer", str(a), str(b), "--ckpt", str(ckpt), "--out", str(out), "--vector", "fgb", "--accelerator", "cpu",
                 "--simplify", "1", "--batch_size", "4"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "a_classes.fgb", "a_classes.tif", "a_confidence.tif", "b_classes.fgb", "b_classes.tif", "b_confidence.tif"]
    for stem in "ab":
        df = gpd.read_file(out / f"{stem}_classes.fgb")
        with rasterio.open(out / f"{stem}_classes.tif") as ds:
            classes = ds.read(1)
            assert df.crs == ds.crs
            pixel_area = abs(ds.transform.a * ds.transform.e)
        assert df.pixels.sum() == (classes != 255).sum() and df.area.sum() == pytest.approx(df.pixels.sum() * pixel_area)
        assert set(df.class_name) <= set(NAMES) and df.confidence.between(1 / 3 - 0.01, 1).all()


@pytest.mark.slow
def test_infer_with_vector_refuses_an_existing_polygon_file_before_predicting(tmp_path, make_scene, capsys):
    """Checked with the other outputs: the raster fails without a class map being written, the others run."""
    ckpt = save_untrained_checkpoint(tmp_path / "model.ckpt", PRE, NAMES)
    a, _ = make_scene("a", size=(30, 30), root=tmp_path / "d")
    b, _ = make_scene("b", size=(30, 30), root=tmp_path / "d", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_classes.gpkg").write_bytes(b"someone's polygons")
    code = main(["infer", str(a), str(b), "--ckpt", str(ckpt), "--out", str(out), "--vector", "gpkg", "--accelerator", "cpu",
                 "--batch_size", "4"])
    captured = capsys.readouterr()
    assert code != 0
    assert f"{out / 'a_classes.gpkg'}: output exists" in captured.err + captured.out
    assert sorted(p.name for p in out.iterdir()) == ["a_classes.gpkg", "b_classes.gpkg", "b_classes.tif", "b_confidence.tif"]
    assert (out / "a_classes.gpkg").read_bytes() == b"someone's polygons"
    assert main(["infer", str(a), "--ckpt", str(ckpt), "--out", str(out), "--vector", "gpkg", "--accelerator", "cpu",
                 "--batch_size", "4", "--overwrite"]) == 0
    assert len(gpd.read_file(out / "a_classes.gpkg")) > 0
