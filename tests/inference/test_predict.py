"""predict_raster: georeferencing, nodata, seamless blending, outputs, atomic writes, errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import Affine

from geobp.data.preprocessing import Preprocessing
from geobp.errors import BandMismatchError, ConfigError, OutputExistsError
from geobp.inference import output_paths, predict_raster
from geobp.inference import sinks as sinks_mod
from tests.conftest import write_tif

K = 4
PRE = Preprocessing(bands=[1, 2, 3], nodata=0, mean=[500.0] * 3, std=[300.0] * 3)


def conv_model(kernel: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Conv2d(3, K, kernel, padding=kernel // 2)
    with torch.no_grad():
        model.weight.mul_(3.0)  # confident, well-separated classes
    return model.eval()


def make_image(path: Path, size=(50, 70), seed=0, nodata_corner=True, **kw) -> Path:
    rng = np.random.default_rng(seed)
    img = rng.integers(1, 1000, (3, *size)).astype("uint16")
    if nodata_corner:
        img[:, :5, :7] = 0
    return write_tif(path, img, nodata=0, **kw)


def reference(model: torch.nn.Module, src: Path) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass over the whole raster: (uint8 classes with 255 at nodata, float probs)."""
    with rasterio.open(src) as ds:
        raw = ds.read()
    x, valid = PRE(raw)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)[None]), 1)[0].numpy()
    classes = probs.argmax(0).astype(np.uint8)
    classes[~valid] = 255
    return classes, probs


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def run(src: Path, dst: Path, model: torch.nn.Module | None = None, **kw) -> Path:
    kw.setdefault("progress", False)
    kw.setdefault("tile_size", 16)
    kw.setdefault("overlap", 8)
    return predict_raster(model or conv_model(), src, dst, PRE, **kw)


def test_georeferencing_preserved_exactly(tmp_path):
    transform = Affine(0.3, 0.0, 123456.789, 0.0, -0.25, 7654321.123)
    src = make_image(tmp_path / "in" / "a.tif", transform=transform)
    out = run(src, tmp_path / "out" / "a_classes.tif")
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert (b.crs, b.transform, b.width, b.height) == (a.crs, a.transform, a.width, a.height)
        assert b.count == 1 and b.dtypes[0] == "uint8"
        assert b.profile["tiled"] and b.profile["compress"] == "deflate"


def test_nodata_pixels_are_255_with_tag(tmp_path):
    src = make_image(tmp_path / "a.tif")
    out = run(src, tmp_path / "a_classes.tif")
    with rasterio.open(out) as ds:
        classes = ds.read(1)
        assert ds.nodata == 255
    assert (classes[:5, :7] == 255).all()
    rest = classes.copy()
    rest[:5, :7] = 0
    assert rest.max() < K


@pytest.mark.parametrize("tile", [16, 24, 64])
def test_seamless_1x1_conv_matches_full_forward(tmp_path, tile):
    # 64 is larger than the 50 x 70 raster along its rows: one padded tile row
    src = make_image(tmp_path / "a.tif")
    model = conv_model(1)
    out = run(src, tmp_path / "a_classes.tif", model, tile_size=tile, overlap=min(8, tile // 2), probabilities="probs", batch_size=3)
    classes, probs = reference(model, src)
    np.testing.assert_array_equal(read(out)[0], classes)
    got = read(output_paths(out, "probs")["probs"]).astype(int)
    want = np.rint(probs * 255).astype(int)
    valid = classes != 255
    assert np.abs(got - want)[:, valid].max() <= 1
    assert (got[:, ~valid] == 0).all()


@pytest.mark.parametrize("tile,overlap", [(16, 8), (24, 8), (32, 12)])
def test_seamless_3x3_conv_with_overlap_covering_receptive_field(tmp_path, tile, overlap):
    # tile-edge pixels (zero padding inside the raster) get near-zero weight, so the blend
    # matches a full-raster forward pass
    src = make_image(tmp_path / "a.tif")
    model = conv_model(3)
    out = run(src, tmp_path / "a_classes.tif", model, tile_size=tile, overlap=overlap, probabilities="probs")
    classes, probs = reference(model, src)
    np.testing.assert_array_equal(read(out)[0], classes)
    got = read(output_paths(out, "probs")["probs"]).astype(int)
    assert np.abs(got - np.rint(probs * 255))[:, classes != 255].max() <= 1


def test_tiles_without_overlap_still_cover_everything(tmp_path):
    src = make_image(tmp_path / "a.tif")
    model = conv_model(1)
    out = run(src, tmp_path / "a_classes.tif", model, tile_size=16, overlap=0)
    np.testing.assert_array_equal(read(out)[0], reference(model, src)[0])


def test_tiny_raster_smaller_than_one_tile(tmp_path):
    src = make_image(tmp_path / "a.tif", size=(5, 3), nodata_corner=False, block=None)
    model = conv_model(1)
    out = run(src, tmp_path / "a_classes.tif", model, tile_size=32, overlap=8)
    got = read(out)
    assert got.shape == (1, 5, 3)
    np.testing.assert_array_equal(got[0], reference(model, src)[0])


def test_single_row_raster(tmp_path):
    src = make_image(tmp_path / "a.tif", size=(1, 40), nodata_corner=False, block=None)
    model = conv_model(1)
    out = run(src, tmp_path / "a_classes.tif", model, tile_size=16, overlap=4)
    np.testing.assert_array_equal(read(out)[0], reference(model, src)[0])


def test_colour_table_and_class_names(tmp_path):
    src = make_image(tmp_path / "a.tif")
    names = ["water", "forest", "urban", "other"]
    out = run(src, tmp_path / "a_classes.tif", class_names=names)
    with rasterio.open(out) as ds:
        cmap = ds.colormap(1)
        tags = ds.tags()
        assert ds.descriptions == ("class",)
    assert tags["CLASS_NAMES"] == "water,forest,urban,other" and tags["NUM_CLASSES"] == "4"
    assert cmap[0] == (30, 100, 200, 255)  # water is blue
    assert len({cmap[i] for i in range(K)}) == K
    assert cmap[255] == (0, 0, 0, 0)


def test_probabilities_file(tmp_path):
    src = make_image(tmp_path / "a.tif")
    out = run(src, tmp_path / "a_classes.tif", probabilities="probs", class_names=list("abcd"))
    probs_path = tmp_path / "a_probs.tif"
    with rasterio.open(probs_path) as ds:
        probs = ds.read()
        mask = ds.dataset_mask()
        assert ds.descriptions == ("a", "b", "c", "d")
        assert ds.scales == pytest.approx((1 / 255,) * K)
        assert ds.crs == rasterio.open(src).crs
    assert probs.shape == (K, 50, 70) and probs.dtype == np.uint8
    total = probs.sum(0, dtype=int)
    valid = read(out)[0] != 255
    assert (np.abs(total[valid] - 255) <= K / 2).all()
    assert (mask[~valid] == 0).all() and (mask[valid] == 255).all()
    # the class is the most probable one (up to uint8 rounding of near-ties)
    classes = read(out)[0].astype(np.int64)
    chosen = np.take_along_axis(probs, np.where(valid, classes, 0)[None], 0)[0].astype(int)
    assert (chosen[valid] >= probs.max(0)[valid].astype(int) - 1).all()


def test_confidence_file(tmp_path):
    src = make_image(tmp_path / "a.tif")
    model = conv_model(1)
    run(src, tmp_path / "a_classes.tif", model, probabilities="confidence")
    conf = read(tmp_path / "a_confidence.tif")
    classes, probs = reference(model, src)
    valid = classes != 255
    assert conf.shape == (1, 50, 70)
    assert np.abs(conf[0].astype(int) - np.rint(probs.max(0) * 255))[valid].max() <= 1
    assert (conf[0][~valid] == 0).all()


def test_cog_output_keeps_colours_and_tags(tmp_path):
    src = make_image(tmp_path / "a.tif", size=(300, 280), nodata_corner=True)
    out = run(src, tmp_path / "a_classes.tif", tile_size=64, overlap=16, cog=True, probabilities="confidence")
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.colormap(1)[255] == (0, 0, 0, 0)
        assert ds.nodata == 255 and "CLASS_NAMES" in ds.tags()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "a_classes.tif", "a_confidence.tif"]


def test_block_aligned_writes_over_several_block_rows(tmp_path, monkeypatch):
    src = make_image(tmp_path / "a.tif", size=(600, 40))
    windows = []
    original = sinks_mod.GeoTiffSink.write_rows

    def spy(self, window, data):
        windows.append((window.row_off, data.shape[1]))
        original(self, window, data)

    monkeypatch.setattr(sinks_mod.GeoTiffSink, "write_rows", spy)
    model = conv_model(1)
    out = run(src, tmp_path / "a_classes.tif", model, tile_size=40, overlap=8)
    assert windows[0][0] == 0 and all(row % 256 == 0 for row, _ in windows)
    assert all(n % 256 == 0 for _, n in windows[:-1]) and sum(n for _, n in windows) == 600
    np.testing.assert_array_equal(read(out)[0], reference(model, src)[0])


class Exploding(torch.nn.Module):
    def __init__(self, after: int) -> None:
        super().__init__()
        self.conv = conv_model(1)
        self.calls = 0
        self.after = after

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom in forward")
        return self.conv(x)


def assert_only_input_left(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["a.tif"]
    assert not [t for t in threading.enumerate() if t.name.startswith("geobp-")]


@pytest.mark.parametrize("cog", [False, True])
def test_model_failure_mid_raster_leaves_nothing(tmp_path, cog):
    src = make_image(tmp_path / "a.tif", size=(300, 70))
    with pytest.raises(RuntimeError, match="boom in forward"):
        run(src, tmp_path / "a_classes.tif", Exploding(after=3), batch_size=2, probabilities="probs", cog=cog)
    assert_only_input_left(tmp_path)


def test_writer_failure_leaves_nothing(tmp_path, monkeypatch):
    src = make_image(tmp_path / "a.tif", size=(600, 70))

    def broken(self, window, data):
        if window.row_off > 0:
            raise OSError("disk full")
        original(self, window, data)

    original = sinks_mod.GeoTiffSink.write_rows
    monkeypatch.setattr(sinks_mod.GeoTiffSink, "write_rows", broken)
    with pytest.raises(OSError, match="disk full"):
        run(src, tmp_path / "a_classes.tif", batch_size=2)
    assert_only_input_left(tmp_path)


def test_failed_run_keeps_previous_output(tmp_path):
    src = make_image(tmp_path / "a.tif")
    out = run(src, tmp_path / "a_classes.tif")
    before = out.read_bytes()
    with pytest.raises(RuntimeError, match="boom in forward"):
        run(src, out, Exploding(after=0), overwrite=True)
    assert out.read_bytes() == before


def test_existing_output_needs_overwrite(tmp_path):
    src = make_image(tmp_path / "a.tif")
    out = run(src, tmp_path / "a_classes.tif")
    with pytest.raises(OutputExistsError, match=r"a_classes\.tif: output exists.*--overwrite"):
        run(src, out)
    (tmp_path / "a_probs.tif").write_bytes(b"old")
    out.unlink()
    with pytest.raises(OutputExistsError, match=r"a_probs\.tif: output exists"):
        run(src, out, probabilities="probs")
    assert not out.exists()
    run(src, out, overwrite=True, probabilities="probs")
    assert read(tmp_path / "a_probs.tif").shape == (K, 50, 70)


def test_band_mismatch_names_file_expected_and_found(tmp_path):
    src = write_tif(tmp_path / "two.tif", np.ones((2, 20, 20), "uint16"))
    with pytest.raises(BandMismatchError, match=r"two\.tif: raster has too few bands.*expected at least 3.*found 2"):
        run(src, tmp_path / "two_classes.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.tif"]


def test_dtype_mismatch_when_training_dtype_known(tmp_path):
    src = make_image(tmp_path / "a.tif")
    with pytest.raises(BandMismatchError, match=r"a\.tif: raster data type differs.*expected uint8, found uint16"):
        run(src, tmp_path / "a_classes.tif", expected_dtype="uint8")


def test_invalid_arguments(tmp_path):
    src = make_image(tmp_path / "a.tif")
    with pytest.raises(ConfigError, match="unknown precision"):
        run(src, tmp_path / "o.tif", precision="64")
    with pytest.raises(ConfigError, match="overlap must be in"):
        run(src, tmp_path / "o.tif", tile_size=16, overlap=16)
    with pytest.raises(ConfigError, match="model predicts 4 classes .expected num_classes=3"):
        run(src, tmp_path / "o.tif", num_classes=3)
    with pytest.raises(ConfigError, match="3 class names for 4 classes"):
        run(src, tmp_path / "o.tif", class_names=["a", "b", "c"])
    with pytest.raises(ConfigError, match="output would overwrite the input"):
        run(src, src, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]


def test_model_changing_spatial_size_is_refused(tmp_path):
    src = make_image(tmp_path / "a.tif")
    model = torch.nn.Sequential(conv_model(1), torch.nn.MaxPool2d(2))
    with pytest.raises(ConfigError, match=r"model output has shape \[8, 4, 8, 8\]"):
        run(src, tmp_path / "a_classes.tif", model)


def test_bf16_autocast_on_cpu_runs(tmp_path):
    src = make_image(tmp_path / "a.tif")
    model = conv_model(1)
    out = run(src, tmp_path / "a_classes.tif", model, precision="bf16")
    agree = (read(out)[0] == reference(model, src)[0]).mean()
    assert agree > 0.95


def test_input_nodata_tag_overrides_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(1, 1000, (3, 30, 30)).astype("uint16")
    img[:, :, -3:] = 7
    src = write_tif(tmp_path / "a.tif", img, nodata=7)
    out = run(src, tmp_path / "a_classes.tif")
    assert (read(out)[0][:, -3:] == 255).all() and (read(out)[0][:, :-3] < K).all()


def test_rasters_without_crs_or_rotated_are_refused(tmp_path):
    from geobp.errors import GeoreferenceError

    nocrs = make_image(tmp_path / "nocrs.tif", crs=None)
    with pytest.raises(GeoreferenceError, match=r"nocrs\.tif: raster has no CRS.*Fix: "):
        run(nocrs, tmp_path / "nocrs_classes.tif")
    rotated = make_image(tmp_path / "rot.tif", transform=Affine(10.0, 2.0, 500000.0, 2.0, -10.0, 5000000.0))
    with pytest.raises(GeoreferenceError, match=r"rot\.tif: transform is rotated"):
        run(rotated, tmp_path / "rot_classes.tif")
    assert not (tmp_path / "nocrs_classes.tif").exists() and not (tmp_path / "rot_classes.tif").exists()


def test_outputs_get_normal_file_permissions(tmp_path):
    # the temporary file (mkstemp) is private; the finished outputs must not be
    import os
    import stat

    umask = os.umask(0o022)
    try:
        dst = run(make_image(tmp_path / "in.tif"), tmp_path / "out" / "in_classes.tif", probabilities="confidence")
    finally:
        os.umask(umask)
    for path in output_paths(dst, "confidence").values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_default_reader_threads_use_the_cores_this_process_may_run_on(monkeypatch):
    from geobp.inference.threads import decode_threads, default_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert default_workers("cpu") == 4 and decode_threads("cpu", 4) == 1
    # on a GPU: 3 readers with 4 GDAL decoding threads each, 2 cores left for the model and the writer
    assert default_workers("cuda") == 3 and decode_threads("cuda", 3) == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert default_workers("cpu") == 1 and default_workers("cuda:0") == 2 and decode_threads("cuda:0", 2) == 1


def test_decoding_threads_are_set_for_the_reads(tmp_path, monkeypatch):
    # the reader threads' handles decode with GDAL_NUM_THREADS threads (an open option of theirs only)
    from geobp.inference import predict as predict_mod
    from geobp.inference import reader as reader_mod

    seen = []
    original = reader_mod.open_reader

    def spy(path, **options):
        seen.append(options)
        return original(path, **options)

    monkeypatch.setattr(reader_mod, "open_reader", spy)
    monkeypatch.setattr(predict_mod, "decode_threads", lambda device, readers: 3)
    dst = run(make_image(tmp_path / "in.tif"), tmp_path / "out" / "in_classes.tif", num_workers=2)
    assert seen and all(o == {"NUM_THREADS": "3"} for o in seen)
    classes, _ = reference(conv_model(), tmp_path / "in.tif")
    assert np.array_equal(read(dst)[0], classes)


def test_options_object_and_keyword_overrides_give_one_set_of_options(tmp_path):
    from geobp.inference import PredictOptions, predict_options

    base = PredictOptions(tile_size=16, overlap=8, progress=False)
    assert predict_options(base) is base
    assert predict_options(base, probabilities="confidence") == PredictOptions(tile_size=16, overlap=8, progress=False,
                                                                               probabilities="confidence")
    with pytest.raises(ConfigError, match=r"unknown prediction option\(s\) \['tile'\] \(expected some of \['tile_size', "):
        predict_options(base, tile=16)
    with pytest.raises(ConfigError, match="overlap must be in"):
        predict_options(base, overlap=16)  # checked by PredictOptions, whichever way it is given
    src = make_image(tmp_path / "a.tif")
    out = predict_raster(conv_model(), src, tmp_path / "a_classes.tif", PRE, base, probabilities="confidence")
    assert read(output_paths(out, "confidence")["confidence"]).shape == (1, 50, 70)


def test_tile_size_defaults_to_the_training_tile_size_and_overlap_to_an_eighth():
    from geobp.inference.predict import DEFAULT_TILE_SIZE, PredictOptions

    class Trained(torch.nn.Module):
        hparams = {"tile_size": 48}

    assert (PredictOptions().for_model(Trained()).tile_size, PredictOptions().for_model(Trained()).overlap) == (48, 6)
    bare = PredictOptions().for_model(conv_model())
    assert (bare.tile_size, bare.overlap) == (DEFAULT_TILE_SIZE, DEFAULT_TILE_SIZE // 8)
    assert PredictOptions(overlap=0).for_model(Trained()).overlap == 0
    assert PredictOptions(tile_size=32).for_model(Trained()).tile_size == 32
    with pytest.raises(ConfigError, match=r"overlap must be in \[0, tile size\) \(tile 48, found overlap 50\)"):
        PredictOptions(overlap=50).for_model(Trained())
    with pytest.raises(ConfigError, match="overlap must not be negative"):
        PredictOptions(overlap=-1)
    with pytest.raises(ConfigError, match="nodata value 2 is a class id"):
        PredictOptions(num_classes=4, nodata_value=2)


def test_choices_import_without_torch():
    # the CLI's parsers take their choices from here; `geobp infer --help` must not load torch
    import subprocess
    import sys

    code = "import sys, geobp.choices; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
