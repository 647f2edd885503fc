"""End to end: `geobp fit` from torchgeo weights in a temporary TORCH_HOME, then `geobp infer`."""

import numpy as np
import pytest
import rasterio
import torch

from geobp.cli import main
from geobp.data.synth import write_scenes
from geobp.inference import predict_raster
from geobp.task import SegmentationTask
from tests.pretrained_helpers import fake_torchgeo_weights
from tests.cli.test_cli import tiny_config

S2 = "ResNet18_Weights.SENTINEL2_ALL_MOCO"


@pytest.fixture
def s2_scenes(tmp_path):
    """Three 4-band scenes whose bands are described B8, B4, B3, B2 (not the weights' order)."""
    root = tmp_path / "scenes"
    write_scenes(root, scenes=3, size=64, bands=4, classes=3, block_size=32)
    for path in sorted((root / "images").glob("*.tif")):
        with rasterio.open(path, "r+") as ds:
            ds.descriptions = ("B8", "B4", "B3", "B2")
    return root


@pytest.mark.slow
def test_fit_from_torchgeo_weights_then_infer(tmp_path, s2_scenes, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    _, state = fake_torchgeo_weights(tmp_path / "torch_home", S2)
    cfg = tiny_config(tmp_path, s2_scenes, bands=[1, 2, 4])
    # a tiny learning rate, so that the trained filters stay within 1e-3 of the pretrained ones
    assert main(["fit", "--config", str(cfg), "--model.weights", S2, "--model.lr", "1e-5"]) == 0
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["weights"] == S2 and hp["in_band_names"] == ["B8", "B4", "B2"]
    pre = hp["preprocessing"]
    assert pre["band_names"] == ["B8", "B4", "B2"] and pre["bands"] == [1, 2, 4]
    assert pre["method"] == "meanstd" and pre["mean"] == [0.0] * 3 and pre["std"] == [10000.0] * 3
    conv1 = ckpt["state_dict"]["model.encoder.conv1.weight"]
    pretrained = state["conv1.weight"]
    torch.testing.assert_close(conv1, pretrained[:, [7, 3, 1]], rtol=0, atol=1e-3)  # B8, B4, B2 of B1..B12
    assert (conv1 - pretrained[:, [1, 2, 3]]).abs().max() > 1e-2  # not the file's band positions
    body = ckpt["state_dict"]["model.encoder.layer4.1.conv2.weight"]
    torch.testing.assert_close(body, state["layer4.1.conv2.weight"], rtol=0, atol=1e-3)

    # inference rebuilds from the checkpoint alone (no weights file) and divides by 10000
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    image = sorted((s2_scenes / "images").glob("*.tif"))[1]
    out = tmp_path / "pred"
    args = ["--ckpt", str(last), "--out", str(out), "--tile-size", "64", "--device", "cpu", "--probabilities", "probs"]
    assert main(["infer", *args, str(image)]) == 0
    with rasterio.open(out / f"{image.stem}_probs.tif") as ds:
        probs = ds.read().astype(np.float32)
    with rasterio.open(out / f"{image.stem}_classes.tif") as ds:
        valid = ds.read(1) != 255
    task = SegmentationTask.from_checkpoint(last)
    with rasterio.open(image) as ds:
        raw = ds.read([1, 2, 4]).astype(np.float32)
    with torch.no_grad():
        expected = 255 * task(torch.from_numpy(raw / 10000.0)[None]).softmax(1)[0].numpy()
    assert valid.mean() > 0.5
    assert np.abs(probs - expected)[:, valid].max() <= 1.0  # uint8 rounding
    # the trained model hardly depends on its input yet, so probe what inference feeds a model with
    # the checkpoint's preprocessing: a 1x1 convolution whose class-0 logit is k * (first band input)
    k = 10000.0 / float(raw[0].mean())
    probe = torch.nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        probe.weight.zero_()
        probe.weight[0, 0] = k
    dst = predict_raster(probe, image, out / "probe_classes.tif", task.preprocessing, tile_size=64, overlap=0,
                         probabilities="probs", progress=False)
    with rasterio.open(dst.with_name("probe_probs.tif")) as ds:
        p0 = ds.read(1).astype(np.float32)
    expected_p0 = 255 / (1 + np.exp(-k * raw[0] / 10000.0))  # softmax of (k x, 0) with x = raw / 10000
    assert np.abs(p0 - expected_p0)[valid].max() <= 1.0
    assert np.ptp(expected_p0[valid]) > 20  # the probe sees the input, not a constant

    # the same scene with its bands stored in another order (B2, B3, B8, B4): `geobp infer` finds the
    # checkpoint's bands (B8, B4, B2) by their descriptions and predicts the same map
    with rasterio.open(image) as ds:
        profile, data = ds.profile, ds.read()
    shuffled = tmp_path / "shuffled" / image.name
    shuffled.parent.mkdir()
    order = [3, 2, 0, 1]
    with rasterio.open(shuffled, "w", **profile) as ds:
        ds.write(data[order])
        ds.descriptions = tuple(("B8", "B4", "B3", "B2")[i] for i in order)
    with pytest.warns(UserWarning, match=r"bands \[3, 4, 1\] hold the model's bands \['B8', 'B4', 'B2'\]"):
        assert main(["infer", *args, "--out", str(tmp_path / "pred_shuffled"), str(shuffled)]) == 0
    with rasterio.open(out / f"{image.stem}_probs.tif") as a, \
            rasterio.open(tmp_path / "pred_shuffled" / f"{image.stem}_probs.tif") as b:
        assert np.array_equal(a.read(), b.read())


def test_fit_with_missing_weights_file_is_one_line(tmp_path, s2_scenes, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    cfg = tiny_config(tmp_path, s2_scenes)
    assert main(["fit", "--config", str(cfg), "--model.weights", S2]) == 2
    err = capsys.readouterr().err
    assert "resnet18_sentinel2_all_moco-59bfdff9.pth: pretrained weights" in err
    assert "Fix: fetch https://hf.co/torchgeo/resnet18_sentinel2_all_moco/" in err and "Traceback" not in err


def test_weights_command_lists_names_bands_normalisation_and_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    from geobp.pretrained import list_pretrained, resolve_pretrained

    cached = resolve_pretrained("ResNet50_Weights.SENTINEL2_ALL_DINO").cache_path
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert main(["weights"]) == 0
    out = capsys.readouterr()
    rows = {line.split("│")[1].strip(): line for line in out.out.splitlines() if line.count("│") > 5}
    assert len(rows) == len(list_pretrained())
    assert "yes" in rows["ResNet50_Weights.SENTINEL2_ALL_DINO"] and "yes" not in rows[S2]
    assert "x / 10000" in rows[S2] and "B8a" in rows[S2]
    assert "per band: mean 0..0, std 255..8160" in rows["ResNet50_Weights.SENTINEL2_MI_MS_SATLAS"]
    assert f"{len(rows)} weights, 1 in the cache" in " ".join(out.err.split())
