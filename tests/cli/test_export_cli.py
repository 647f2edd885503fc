"""`geobp export` and `geobp infer --model` end to end through `geobp.cli.main`: the exported files
give the checkpoint's class maps; bad model files and bad arguments are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from geobp.cli import main
from tests.export_helpers import tiny_checkpoint, uint16_raster

# one xdist worker runs this module: the checkpoint is trained and exported once
pytestmark = pytest.mark.xdist_group("export")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_cli")
    ckpt = tiny_checkpoint(tmp / "model.ckpt", steps=1, seed=3)
    raster = uint16_raster(tmp / "in" / "scene.tif", size=(70, 64), seed=2)
    assert main(["infer", str(raster), "--ckpt", str(ckpt), "--out", str(tmp / "ref"), "--device", "cpu"]) == 0
    return {"tmp": tmp, "ckpt": ckpt, "raster": raster}


def classes(folder):
    with rasterio.open(folder / "scene_classes.tif") as ds:
        return ds.read(1)


@pytest.mark.parametrize("fmt, name", [("onnx", "m.onnx"), ("torchscript", "m.ts")])
def test_export_then_infer_with_the_model_gives_the_checkpoints_class_map(run, fmt, name, capsys):
    tmp = run["tmp"]
    assert main(["export", str(run["ckpt"]), "--format", fmt, "--out", str(tmp / name)]) == 0
    assert f"-> {tmp / name} ({fmt})" in " ".join(capsys.readouterr().err.split())
    out = tmp / f"out_{fmt}"
    assert main(["infer", str(run["raster"]), "--model", str(tmp / name), "--out", str(out), "--device", "cpu"]) == 0
    expected = classes(tmp / "ref")
    assert (expected == 255).any()
    np.testing.assert_array_equal(classes(out), expected)


def test_bad_model_files_are_one_line_errors(run, capsys):
    tmp = run["tmp"]
    corrupt = tmp / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model at all")
    for path, problem in [(corrupt, "cannot read the ONNX model"), (tmp / "missing.onnx", "model file not found")]:
        code = main(["infer", str(run["raster"]), "--model", str(path), "--out", str(tmp / "bad"), "--device", "cpu"])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: {problem}") and "Fix: export the checkpoint with `geobp export" in err
        assert "Traceback" not in err and "\n" not in err.strip()  # one line
    assert not (tmp / "bad").exists()


def test_ckpt_and_model_are_one_or_the_other(run, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["infer", str(run["raster"]), "--ckpt", "a.ckpt", "--model", "m.onnx", "--out", "x"])
    assert stop.value.code == 2
    assert "argument --model: not allowed with argument --ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["infer", str(run["raster"]), "--out", "x"])
    assert "one of the arguments --ckpt/--ckpt_path --model is required" in capsys.readouterr().err


def test_export_of_a_missing_checkpoint_and_a_wrong_suffix(run, capsys):
    tmp = run["tmp"]
    assert main(["export", str(tmp / "none.ckpt"), "--out", str(tmp / "x.onnx")]) == 2
    assert "none.ckpt: checkpoint not found" in capsys.readouterr().err
    assert main(["export", str(run["ckpt"]), "--format", "torchscript", "--out", str(tmp / "x.onnx")]) == 2
    assert "x.onnx: a torchscript model needs the suffix .pt or .ts (found .onnx)" in " ".join(capsys.readouterr().err.split())
    assert not (tmp / "x.onnx").exists()
