"""`geobp export`'s library: ONNX and TorchScript files of a tiny trained model give the checkpoint's
maps (class maps identical, probabilities within 1/255), at any batch and tile size; their
metadata round-trips; bad files and mismatched rasters are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import rasterio
import torch

from geobp.data.preprocessing import Preprocessing
from geobp.errors import ConfigError, DataNotFoundError, ExportedModelError, OutputExistsError
from geobp.inference import predict_many
from geobp.inference.export import ONNX_OPSET, RawToProbabilities, export_metadata, export_model
from geobp.inference.exported import TORCHSCRIPT_METADATA, ModelMetadata, load_exported
from geobp.task import SegmentationTask
from tests.conftest import write_tif
from tests.export_helpers import NAMES, PRE, tiny_checkpoint, uint16_raster

# one xdist worker runs this module: the checkpoint is trained and exported once
pytestmark = pytest.mark.xdist_group("export")

FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    ckpt = tiny_checkpoint(tmp / "model.ckpt")
    files = {fmt: export_model(ckpt, tmp / name, fmt) for fmt, name in FILES.items()}
    rasters = [uint16_raster(tmp / "in" / "a.tif"), uint16_raster(tmp / "in" / "b.tif", size=(40, 75), seed=1)]
    reference = tmp / "reference"
    assert predict_many(ckpt, rasters, reference, batch_size=4, probabilities="probs", progress=False).ok
    return {"tmp": tmp, "ckpt": ckpt, "files": files, "rasters": rasters, "reference": reference}


def read(path):
    with rasterio.open(path) as ds:
        return ds.read()


def assert_same_maps(one, two, names=("a", "b")):
    for name in names:
        classes, expected = read(two / f"{name}_classes.tif"), read(one / f"{name}_classes.tif")
        np.testing.assert_array_equal(classes, expected)
        assert (expected == 255).any() and (expected < 3).any()  # nodata pixels and classes both
        probs = read(two / f"{name}_probs.tif").astype(int)
        assert np.abs(probs - read(one / f"{name}_probs.tif").astype(int)).max() <= 1  # within 1/255


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_give_the_checkpoints_maps_on_a_uint16_raster_with_nodata(exported, fmt):
    out = exported["tmp"] / f"out_{fmt}"
    summary = predict_many(exported["files"][fmt], exported["rasters"], out, batch_size=4, probabilities="probs", progress=False)
    assert summary.ok, summary.lines()
    assert summary.class_names == NAMES
    assert_same_maps(exported["reference"], out)
    with rasterio.open(out / "a_classes.tif") as ds:
        assert ds.tags()["CLASS_NAMES"] == "water,forest,urban"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_other_batch_and_tile_sizes_than_the_export_example(exported, fmt):
    """Traced with batch 2 and 32 px tiles; run with batch 3 and 48 px tiles (not a multiple of the
    U-Net's stride: the graph pads as the U-Net does)."""
    tmp = exported["tmp"]
    options = {"batch_size": 3, "tile_size": 48, "overlap": 8, "probabilities": "probs", "progress": False}
    assert predict_many(exported["ckpt"], exported["rasters"], tmp / f"ref48_{fmt}", **options).ok
    assert predict_many(exported["files"][fmt], exported["rasters"], tmp / f"out48_{fmt}", **options).ok
    assert_same_maps(tmp / f"ref48_{fmt}", tmp / f"out48_{fmt}")


def test_onnx_runtime_alone_gives_the_checkpoints_probabilities(exported):
    """What a user without geobp runs: raw uint16 pixels in, probabilities out, two batch and tile sizes."""
    task = SegmentationTask.from_checkpoint(exported["ckpt"])
    pre = task.preprocessing
    session = ort.InferenceSession(str(exported["files"]["onnx"]), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert (graph_input.name, graph_input.type) == ("pixels", "tensor(uint16)")
    assert graph_input.shape == ["batch", 3, "height", "width"]
    for shape in [(1, 3, 64, 96), (3, 3, 40, 33)]:
        raw = np.random.default_rng(shape[0]).integers(1, 700, shape).astype(np.uint16)
        raw[:, :, :5, :7] = 0  # nodata in every band
        raw[:, 1, 10:12, :] = 0  # nodata in one band only: a valid pixel
        (probs,) = session.run(None, {"pixels": raw})
        with torch.no_grad():
            x, _ = pre.normalize_tensor(torch.from_numpy(raw))
            expected = torch.softmax(task(x), dim=1).numpy()
        assert probs.shape == expected.shape
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_graph_normalises_as_preprocessing_percentile_float_nan_and_nodata():
    """Percentile scaling of float32 pixels, nodata -9999 and NaN: the graph's input to the model is
    the float32 tensor Preprocessing gives."""
    pre = Preprocessing(bands=[1, 2], nodata=-9999.0, method="percentile", mean=[0.0, 0.0], std=[1.0, 1.0],
                        low=[10.0, -5.0], high=[200.0, 50.5], dtype="float32")
    seen = []

    class Record(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x[:, :1].repeat(1, 3, 1, 1)

    raw = torch.from_numpy(np.random.default_rng(0).uniform(-50, 300, (2, 2, 8, 8)).astype(np.float32))
    raw[:, :, 0, 0] = -9999.0
    raw[0, 1, 2, 3] = float("nan")
    raw[1, 0, 4, 4] = float("inf")
    raw[1, 1, 5, 5] = -9999.0  # one band only: valid
    RawToProbabilities(Record(), pre, "float32")(raw)
    expected, valid = pre.normalize_tensor(raw)
    assert not valid[0, 0, 0] and not valid[0, 2, 3] and not valid[1, 4, 4] and valid[1, 5, 5]
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


def test_metadata_round_trips(exported):
    task = SegmentationTask.from_checkpoint(exported["ckpt"])
    expected = export_metadata(task, task.preprocessing)
    assert expected.input_dtype == "uint16" and expected.band_names == ["red", "green", "nir"]
    assert expected.class_names == NAMES and expected.tile_size == 32 and expected.nodata == 0
    assert expected.normalisation == {"method": "meanstd", "mean": PRE["mean"], "std": PRE["std"]}
    assert expected.class_colours[0] == [30, 100, 200] and expected.training_crs is None
    for fmt, path in exported["files"].items():
        assert load_exported(path).metadata == expected, fmt
    model = onnx.load(str(exported["files"]["onnx"]))
    props = {p.key: json.loads(p.value) for p in model.metadata_props}  # every value is JSON
    assert props["geobp_export"] == 1 and props["band_names"] == ["red", "green", "nir"] and props["input_dtype"] == "uint16"
    assert props["normalisation"]["std"] == PRE["std"] and props["class_names"] == NAMES
    assert model.opset_import[0].version == ONNX_OPSET
    extra = {TORCHSCRIPT_METADATA: ""}
    torch.jit.load(str(exported["files"]["torchscript"]), _extra_files=extra)
    assert json.loads(extra[TORCHSCRIPT_METADATA])["class_names"] == NAMES
    assert ModelMetadata.from_props("m", expected.to_props()) == expected
    nan = ModelMetadata(**{**expected.__dict__, "nodata": float("nan")})
    assert np.isnan(ModelMetadata.from_props("m", nan.to_props()).nodata)


def test_foreign_corrupt_and_missing_model_files_are_one_line_errors(exported, tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "foreign", [x], [y])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(foreign))
    with pytest.raises(ExportedModelError, match=r"foreign\.onnx: not a geobp export \(its metadata has no geobp_export entry\)\. "
                       r"Fix: export the checkpoint with `geobp export CKPT --format onnx"):
        load_exported(foreign)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(ExportedModelError, match=r"corrupt\.onnx: cannot read the ONNX model \(.*\)\. Fix: export the checkpoint") as err:
        load_exported(corrupt)
    assert "\n" not in str(err.value)
    corrupt_ts = tmp_path / "corrupt.pt"
    corrupt_ts.write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(ExportedModelError, match=r"corrupt\.pt: cannot read the TorchScript model \(.*\)\. Fix: export") as err:
        load_exported(corrupt_ts)
    assert "\n" not in str(err.value)
    plain_ts = tmp_path / "plain.ts"
    torch.jit.save(torch.jit.script(torch.nn.ReLU()), str(plain_ts))
    with pytest.raises(ExportedModelError, match=r"plain\.ts: not a geobp export"):
        load_exported(plain_ts)
    with pytest.raises(DataNotFoundError, match=r"missing\.onnx: model file not found\. Fix: export the checkpoint"):
        load_exported(tmp_path / "missing.onnx")
    with pytest.raises(ConfigError, match=r"model\.ckpt: unknown model file type '\.ckpt' \(expected one of \.onnx, \.pt, \.ts\)"):
        load_exported(exported["ckpt"])
    # predict_many reports them the same way (loading happens before any raster)
    with pytest.raises(ExportedModelError, match=r"foreign\.onnx: not a geobp export"):
        predict_many(foreign, exported["rasters"], tmp_path / "out", progress=False)


def test_rasters_that_do_not_match_the_metadata_are_one_line_failures(exported, tmp_path):
    rng = np.random.default_rng(0)
    floats = write_tif(tmp_path / "floats.tif", rng.uniform(0, 700, (3, 40, 40)).astype("float32"))
    two_bands = write_tif(tmp_path / "two_bands.tif", rng.integers(1, 700, (2, 40, 40)).astype("uint16"))
    summary = predict_many(exported["files"]["onnx"], [floats, two_bands], tmp_path / "out", progress=False)
    messages = dict((p.name, m) for p, m in summary.failed)
    assert "floats.tif: raster data type differs from training (expected uint16, found float32). Fix:" in messages["floats.tif"]
    assert "two_bands.tif: raster has too few bands for the model (expected at least 3" in messages["two_bands.tif"]
    assert all("\n" not in m for m in messages.values())


def test_export_refuses_a_wrong_suffix_and_an_existing_file(exported):
    tmp = exported["tmp"]
    with pytest.raises(ConfigError, match=r"model\.onnx: a torchscript model needs the suffix \.pt or \.ts \(found \.onnx\)\. "
                       r"Fix: name the file model\.pt"):
        export_model(exported["ckpt"], tmp / "model.onnx", "torchscript")
    with pytest.raises(OutputExistsError, match=r"model\.onnx: output exists\. Fix: pass --overwrite"):
        export_model(exported["ckpt"], tmp / "model.onnx", "onnx")
    with pytest.raises(ConfigError, match=r"unknown format 'tflite' \(expected onnx or torchscript\)"):
        export_model(exported["ckpt"], tmp / "model.tflite", "tflite")  # type: ignore[arg-type]
