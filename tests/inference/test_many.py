"""predict_many: one checkpoint over many rasters; a bad input is reported and the rest finish."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from geobp.errors import ConfigError
from geobp.inference import expand_inputs, predict_many
from geobp.task import SegmentationTask
from tests.conftest import save_untrained_checkpoint

PRE = {"bands": [1, 2, 3], "nodata": 0, "method": "meanstd", "mean": [300.0] * 3, "std": [100.0] * 3, "low": [], "high": []}
NAMES = ["water", "forest", "urban"]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_untrained_checkpoint(tmp_path / "model.ckpt", PRE, NAMES)


def test_one_corrupt_input_among_many(tmp_path, make_scene, ckpt, monkeypatch):
    a, _ = make_scene("a", size=(40, 48), root=tmp_path / "d1")
    b, _ = make_scene("b", size=(30, 30), root=tmp_path / "d2", seed=1)
    bad = tmp_path / "d2" / "images" / "corrupt.tif"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    loads = []
    original = SegmentationTask.from_checkpoint.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(SegmentationTask, "from_checkpoint", classmethod(counting))
    out = tmp_path / "out"
    # a folder (holding b and the corrupt file) and a single file
    summary = predict_many(ckpt, [b.parent, a], out, progress=False, batch_size=4)
    assert len(loads) == 1
    assert [s.name for s, _ in summary.succeeded] == ["b.tif", "a.tif"]
    assert len(summary.failed) == 1 and summary.failed[0][0] == bad
    assert "corrupt.tif: not a readable raster" in summary.failed[0][1]
    assert not summary.ok and summary.exit_code == 1
    assert "FAILED" in summary.lines()[0] and summary.lines()[-1] == "2 raster(s) predicted, 1 failed"
    assert sorted(p.name for p in out.iterdir()) == ["a_classes.tif", "b_classes.tif"]
    with rasterio.open(out / "a_classes.tif") as ds, rasterio.open(a) as src:
        assert ds.tags()["CLASS_NAMES"] == "water,forest,urban"
        assert (ds.crs, ds.transform, ds.shape) == (src.crs, src.transform, src.shape)
        assert ds.read(1).max() < 3


def test_existing_outputs_and_missing_files_are_failures_not_crashes(tmp_path, make_scene, ckpt):
    a, _ = make_scene("a", size=(32, 32), root=tmp_path)
    out = tmp_path / "out"
    task = SegmentationTask.from_checkpoint(ckpt)
    assert predict_many(task, [a], out, progress=False).ok
    (tmp_path / "nothing").mkdir()
    summary = predict_many(task, [a, tmp_path / "missing.tif", tmp_path / "nothing"], out, progress=False)
    messages = [m for _, m in summary.failed]
    assert len(messages) == 3 and not summary.succeeded
    assert any("nothing: folder holds no .tif or .tiff files" in m for m in messages)
    assert any("a_classes.tif: output exists" in m and "--overwrite" in m for m in messages)
    assert any("missing.tif: file not found" in m for m in messages)
    summary = predict_many(task, [a], out, progress=False, overwrite=True, probabilities="confidence")
    assert summary.ok and (out / "a_confidence.tif").exists()


def test_empty_folder_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    rasters, problems = expand_inputs([tmp_path / "empty"])
    assert rasters == []
    assert "empty: folder holds no .tif or .tiff files" in problems[0][1]


def test_duplicate_names_are_refused_before_any_work(tmp_path, make_scene, ckpt):
    a1, _ = make_scene("a", size=(32, 32), root=tmp_path / "x")
    a2, _ = make_scene("a", size=(32, 32), root=tmp_path / "y")
    with pytest.raises(ConfigError, match=r"a\.tif: same file name as .*a_classes\.tif"):
        predict_many(ckpt, [a1, a2], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_overlap_for_checkpoint_tile_size(tmp_path, make_scene, ckpt):
    a, _ = make_scene("a", size=(32, 32), root=tmp_path)
    with pytest.raises(ConfigError, match=r"overlap must be in \[0, tile size\) \(tile 32, found overlap 40\)"):
        predict_many(ckpt, [a], tmp_path / "out", overlap=40, progress=False)


def test_folder_inputs_skip_hidden_files_as_the_data_module_does(tmp_path):
    from geobp.inference import expand_inputs

    (tmp_path / "a.tif").write_bytes(b"x")
    (tmp_path / "B.TIFF").write_bytes(b"x")
    (tmp_path / ".a.part.tif").write_bytes(b"x")  # a temporary file of an unfinished write
    (tmp_path / "notes.txt").write_text("x")
    found, missing = expand_inputs([tmp_path])
    assert [p.name for p in found] == ["B.TIFF", "a.tif"] and missing == []


def test_normalize_on_reaches_the_readers_through_predict_many(tmp_path, make_scene, ckpt, monkeypatch):
    from geobp.inference import predict as predict_mod

    a, _ = make_scene("a", size=(40, 36), root=tmp_path)
    seen = []
    original = predict_mod.normalized_on

    def spy(opts, dtype):
        seen.append(opts.normalize_on)
        return original(opts, dtype)

    monkeypatch.setattr(predict_mod, "normalized_on", spy)
    for where in ("reader", "device"):
        assert predict_many(ckpt, [a], tmp_path / where, progress=False, normalize_on=where).ok
    assert seen == ["reader", "device"]
    with rasterio.open(tmp_path / "reader" / "a_classes.tif") as x, rasterio.open(tmp_path / "device" / "a_classes.tif") as y:
        assert np.array_equal(x.read(), y.read())


def test_predict_many_takes_an_options_object_and_the_checkpoint_fills_in_the_rest(tmp_path, make_scene, ckpt, monkeypatch):
    from geobp.inference import PredictOptions
    from geobp.inference import batch as batch_mod

    a, _ = make_scene("a", size=(40, 36), root=tmp_path)
    got = []
    monkeypatch.setattr(batch_mod, "predict_raster", lambda task, src, dst, pre, opts: got.append(opts))
    assert predict_many(ckpt, [a], tmp_path / "out", PredictOptions(batch_size=2, progress=False), overwrite=True).ok
    (opts,) = got
    assert (opts.batch_size, opts.overwrite, opts.tile_size, opts.overlap) == (2, True, 32, 4)  # the checkpoint's tile size
    assert (opts.num_classes, opts.class_names) == (3, NAMES)
