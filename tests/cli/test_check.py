"""Bad input: each broken file gets a clear, per-file problem; `geobp check` exits non-zero."""

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.transform import Affine, from_origin

from geobp.cli import main
from geobp.data.scenes import check_dataset
from geobp.errors import GeoreferenceError, RasterReadError
from geobp.raster import open_raster, read_window
from tests.conftest import write_tif


@pytest.fixture
def good(make_scene, tmp_path):
    for name in ("a", "b"):
        make_scene(name, nodata=0)
    return tmp_path / "data"


def problems(reports, name):
    return next(r for r in reports if r.name == name).problems


def only_fatal(reports, name):
    r = next(r for r in reports if r.name == name)
    assert r.fatal, r.problems
    return " ".join(p.message for p in r.problems if p.severity == "fatal")


def test_clean_dataset_passes(good, capsys):
    reports = check_dataset(good, num_classes=3)
    assert not any(r.problems for r in reports)
    assert main(["check", str(good), "--num-classes", "3"]) == 0


def test_random_bytes_empty_and_truncated_files(good, make_scene, tmp_path):
    (good / "images" / "junk.tif").write_bytes(np.random.default_rng(0).bytes(5000))
    write_tif(good / "masks" / "junk.tif", np.zeros((64, 64), np.uint8))
    (good / "images" / "empty.tif").write_bytes(b"")
    write_tif(good / "masks" / "empty.tif", np.zeros((64, 64), np.uint8))
    # a truncated download: a COG (headers first) cut in half, so it opens but blocks fail to decode
    img, _ = make_scene("trunc", size=(256, 256), nodata=0)
    cog = tmp_path / "cog.tif"
    rasterio.shutil.copy(img, cog, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=64)
    raw = cog.read_bytes()
    img.write_bytes(raw[: len(raw) // 2])
    reports = check_dataset(good, num_classes=3)
    assert "junk.tif: not a readable raster" in only_fatal(reports, "junk")
    assert "empty.tif: not a readable raster: the file is empty" in only_fatal(reports, "empty")
    msg = only_fatal(reports, "trunc")
    assert "trunc.tif" in msg and ("failed to read window" in msg or "not a readable raster" in msg)
    assert "Fix:" in msg
    assert not next(r for r in reports if r.name == "a").fatal
    assert main(["check", str(good)]) == 1


def test_truncated_block_error_names_file_and_window(make_scene, tmp_path):
    img, _ = make_scene("t", size=(256, 256))
    cog = tmp_path / "cog.tif"
    rasterio.shutil.copy(img, cog, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=64)
    raw = cog.read_bytes()
    cog.write_bytes(raw[: len(raw) // 2])
    with open_raster(cog) as src:
        with pytest.raises(RasterReadError, match=r"cog.tif: failed to read window \(row 192, col 192, 64x64\).*Fix: "):
            read_window(src, rasterio.windows.Window(192, 192, 64, 64))


def test_no_crs_and_rotated_transform(good):
    write_tif(good / "images" / "nocrs.tif", np.ones((3, 32, 32), np.uint16), crs=None)
    write_tif(good / "masks" / "nocrs.tif", np.zeros((32, 32), np.uint8), crs=None)
    rotated = Affine(10.0, 2.0, 500000.0, 2.0, -10.0, 5000000.0)
    write_tif(good / "images" / "rot.tif", np.ones((3, 32, 32), np.uint16), transform=rotated)
    write_tif(good / "masks" / "rot.tif", np.zeros((32, 32), np.uint8), transform=rotated)
    reports = check_dataset(good)
    assert "nocrs.tif: raster has no CRS" in only_fatal(reports, "nocrs")
    assert "rot.tif: transform is rotated" in only_fatal(reports, "rot")
    assert isinstance(problems(reports, "rot")[0].error, GeoreferenceError)


def test_shifted_mask_and_out_of_range_labels(good, make_scene):
    _, msk = make_scene("shift")
    write_tif(msk, np.zeros((64, 64), np.uint8), transform=from_origin(500020.0, 5000000.0, 10.0, 10.0))
    _, msk2 = make_scene("labels")
    write_tif(msk2, np.full((64, 64), 7, np.uint8))
    reports = check_dataset(good, num_classes=3)
    assert "masks/shift.tif: transform differs from its image" in only_fatal(reports, "shift")
    assert "masks/labels.tif: mask values [7] are outside the 3 classes" in only_fatal(reports, "labels")


def test_nan_and_all_nodata_are_warnings(tmp_path):
    root = tmp_path / "f"
    img = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    img[:, :4, :4] = np.nan
    write_tif(root / "images" / "nan.tif", img, nodata=-9999.0)
    write_tif(root / "masks" / "nan.tif", np.zeros((32, 32), np.uint8))
    write_tif(root / "images" / "void.tif", np.full((3, 32, 32), -9999.0, np.float32), nodata=-9999.0)
    write_tif(root / "masks" / "void.tif", np.zeros((32, 32), np.uint8))
    reports = check_dataset(root, num_classes=2)
    nan = problems(reports, "nan")
    assert [p.severity for p in nan] == ["warning"] and "16 pixels are NaN" in nan[0].message
    void = problems(reports, "void")
    assert any("every pixel is nodata" in p.message for p in void)
    assert not any(r.fatal for r in reports)
    assert main(["check", str(root)]) == 0


def test_band_count_mismatch_between_scenes(good, make_scene):
    make_scene("four", bands=4)
    reports = check_dataset(good)
    assert "four.tif: band count/dtype differs" in only_fatal(reports, "four")


def test_check_missing_folder_exit_code(tmp_path, capsys):
    assert main(["check", str(tmp_path / "none")]) == 2
    assert "none/images: folder not found" in capsys.readouterr().err


def test_check_with_data_options_reports_label_sources_coverage_histogram_and_unmapped(tmp_path, capsys):
    """`geobp check --config CFG` and `--data.*`: per scene the label sources, CRS/resolution, coverage, classes, unmapped values."""
    import yaml

    from tests.data.test_labels import labels_around, write_image

    a = write_image(tmp_path / "img" / "a.tif")
    write_image(tmp_path / "img" / "b.tif", origin=(500640.0, 5000000.0), seed=1)
    labels, transform = labels_around(a, "EPSG:3035", 30.0)  # covers a and only part of b
    codes = np.array([10, 20, 80], np.uint8)[labels]
    write_tif(tmp_path / "wc.tif", codes, crs="EPSG:3035", transform=transform, block=None)
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"max_epochs": 1}, "data": {
        "images": str(tmp_path / "img"), "labels": str(tmp_path / "wc.tif"), "num_classes": 3,
        "class_names": ["tree", "grass", "water"], "label_map": {10: 0, 20: 1}}}))
    assert main(["check", "--config", str(cfg)]) == 1  # 80 is not mapped
    out = " ".join(capsys.readouterr().out.split())
    assert "wc.tif" in out and "EPSG:3035 30 x 30" in out and "EPSG:32633 10 x 10" in out and "80" in out
    assert main(["check", "--config", str(cfg), "--data.label_map", "{10: 0, 20: 1, 80: 2}"]) == 0
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())
    assert "100.0%" in out  # a is covered whole
    assert "tree:" in out and "grass:" in out and "water:" in out
    assert "2 scenes, 0 unusable" in " ".join(captured.err.split())
    assert main(["check", "--data.images", str(tmp_path / "img"), "--data.labels", str(tmp_path / "wc.tif"),
                 "--data.num_classes", "3", "--data.label_map={10: 0, 20: 1, 80: 2}"]) == 0
    capsys.readouterr()
    # not an option of geobp check: jsonargparse's error, as one line, exit 2
    assert main(["check", "--data.images", str(tmp_path / "img"), "--trainer.max_epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --trainer.max_epochs" in err and len(err.strip().splitlines()) == 1
    assert main(["check", "--data.images", str(tmp_path / "img"), "--data.num_classes", "3"]) == 2
    assert "data.images and data.labels are both needed" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_check_reads_scenes_in_several_processes_with_the_same_reports(tmp_path):
    from geobp.data.scenes import check_dataset
    from geobp.data.synth import write_scenes

    write_scenes(tmp_path / "d", scenes=4, size=48, bands=3, classes=3, block_size=16)
    one = check_dataset(tmp_path / "d", num_classes=2, full=True)  # class 2 is out of range: a fatal problem
    two = check_dataset(tmp_path / "d", num_classes=2, full=True, workers=2)
    assert [(r.name, r.labels, r.valid_fraction, [p.message for p in r.problems]) for r in two] == \
        [(r.name, r.labels, r.valid_fraction, [p.message for p in r.problems]) for r in one]
    assert any(r.fatal for r in two) and all(r.labels is not None for r in two)


def test_check_data_options_are_the_data_modules_typed_options(tmp_path, capsys):
    """--data.* goes through jsonargparse and the data module's signature: typed values, one-line errors."""
    import yaml

    from geobp.cli.check import parse_check_args

    a = parse_check_args(["--data.images", "img", "--data.labels", "wc.tif", "--data.label_map", "{-1: 255, 11: 0}",
                          "--data.num_classes", "3"])
    assert a.data.label_map == {-1: 255, 11: 0} and a.data.num_classes == 3 and a.data.tile_size == 256  # a default
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"max_epochs": 1}, "model": {"encoder": "resnet18"},
                                   "data": {"images": "img", "labels": "wc.tif", "num_classes": 3, "label_field": "code"}}))
    a = parse_check_args(["--config", str(cfg), "--data.num_classes", "4"])  # the command line over the config
    assert (a.data.images, a.data.label_field, a.data.num_classes) == ("img", "code", 4)
    for argv, expected in (
        (["--data.lable_map", "{1: 2}"], "unrecognized arguments: --data.lable_map. Did you mean --data.label_map?"),
        (["--data.num_classes", "three"], 'Parser key "data.num_classes":'),
        (["--data.label_map", "[1, 2]"], 'Parser key "data.label_map":'),
    ):
        assert main(["check", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and "Fix:" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    cfg.write_text(yaml.safe_dump({"data": {"images": "img", "tiles_sise": 3}}))
    assert main(["check", "--config", str(cfg)]) == 2
    assert "does not accept option 'tiles_sise'" in capsys.readouterr().err
