"""Raw tiles normalised on the model's device: the same outputs as tiles normalised by the readers.

On CUDA the readers hand over the input's raw pixels (uint16: half the bytes of float32) and the
GPU normalises them; here the same path is forced on the CPU (``normalize_on="device"``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geobp.data.preprocessing import Preprocessing
from geobp.errors import ConfigError
from geobp.inference import PredictOptions, output_paths, predict_raster
from geobp.inference.predict import normalized_on
from geobp.inference.procreader import ProcessReader, SlotLayout
from geobp.inference.reader import PrefetchReader, TileBatch, raw_dtype
from geobp.tiling import TileGrid
from tests.conftest import write_tif
from tests.inference.test_predict import PRE, conv_model, make_image

PERCENTILE = Preprocessing(bands=[3, 1], nodata=0, method="percentile", low=[50.0, 80.0], high=[900.0, 950.0])


@pytest.mark.parametrize("reader", ["threads", "processes"])
@pytest.mark.parametrize("probabilities", ["none", "probs"])
def test_device_normalisation_writes_the_same_bytes(tmp_path, reader, probabilities, monkeypatch):
    raw_batches: list[bool] = []
    original = TileBatch.on_device

    def spy(self, *args):
        raw_batches.append(self.valid is None)
        return original(self, *args)

    monkeypatch.setattr(TileBatch, "on_device", spy)
    src = make_image(tmp_path / "a.tif", size=(90, 70))  # nodata corner
    small = make_image(tmp_path / "small.tif", size=(20, 26), seed=1)  # smaller than a tile: padded
    model = conv_model(3)
    for path in (src, small):
        outs = {}
        for where in ("reader", "device"):
            dst = predict_raster(model, path, tmp_path / where / f"{path.stem}_classes.tif", PRE, tile_size=32, overlap=8,
                                 batch_size=3, probabilities=probabilities, progress=False, num_workers=2,
                                 reader=reader, normalize_on=where)
            outs[where] = {key: p.read_bytes() for key, p in output_paths(dst, probabilities).items()}
            assert set(raw_batches) == {where == "device"}  # raw tiles exactly when asked for
            raw_batches.clear()
        assert outs["reader"] == outs["device"], path.name


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_raw_batches_hold_the_pixels_and_normalise_to_the_readers_values(tmp_path, kind):
    rng = np.random.default_rng(0)
    img = rng.integers(1, 1000, (3, 40, 50)).astype("uint16")
    img[:, :4, :6] = 0
    path = write_tif(tmp_path / "a.tif", img, nodata=0)
    grid = TileGrid.build(40, 50, 16, 4)
    batches = grid.batches(4)
    cls = ProcessReader if kind == "processes" else PrefetchReader
    with PrefetchReader(path, grid, batches, PERCENTILE, num_workers=1) as ref:
        want = list(ref)
    with cls(path, grid, batches, PERCENTILE, num_workers=2, raw=raw_dtype("uint16")) as reader:
        got = list(reader)
    assert [b.tiles for b in got] == batches
    for a, b in zip(want, got):
        assert b.valid is None and b.image.dtype == torch.uint16
        for n, (i, j) in enumerate(b.tiles):  # the raw pixels of the tile's window, bands 3 and 1
            r, c = grid.row_offsets[i], grid.col_offsets[j]
            assert np.array_equal(b.image[n].numpy(), img[[2, 0], r : r + 16, c : c + 16])
        image, valid = b.on_device(torch.device("cpu"), PERCENTILE, grid.tile_h, grid.tile_w)
        assert image.numpy().tobytes() == a.image.numpy().tobytes()
        assert torch.equal(valid, a.valid)


def test_raw_slots_take_the_raw_bytes_and_no_validity():
    float_slot = SlotLayout(8, 6, 256, 256, 256)
    raw_slot = SlotLayout(8, 6, 256, 256, 256, "uint16")
    assert raw_slot.image_bytes * 2 == float_slot.image_bytes
    assert raw_slot.stride < float_slot.stride / 2
    ring = np.zeros(raw_slot.stride * 2, np.uint8)
    image, valid = raw_slot.views(ring, 1, 3)
    assert image.dtype == np.uint16 and image.shape == (3, 6, 256, 256) and valid is None


def test_where_tiles_are_normalised():
    assert normalized_on(PredictOptions(device="cuda:0"), "uint16") == "device"
    assert normalized_on(PredictOptions(), "uint16") == "reader"  # the CPU: the readers' threads do it
    assert normalized_on(PredictOptions(normalize_on="device"), "uint16") == "device"
    assert normalized_on(PredictOptions(device="cuda", normalize_on="reader"), "float32") == "reader"
    assert normalized_on(PredictOptions(device="cuda"), "longdouble") == "reader"  # torch cannot carry it raw
    with pytest.raises(ConfigError, match="unknown normalize_on 'gpu'"):
        PredictOptions(normalize_on="gpu")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_normalisation_on_cuda_writes_the_same_bytes(tmp_path):
    src = make_image(tmp_path / "a.tif", size=(90, 70))
    model = conv_model(3)
    outs = {}
    for where in ("reader", "device"):
        dst = predict_raster(model, src, tmp_path / where / "a_classes.tif", PRE, tile_size=32, overlap=8, batch_size=3,
                             probabilities="probs", progress=False, device="cuda", normalize_on=where)
        outs[where] = {key: p.read_bytes() for key, p in output_paths(dst, "probs").items()}
    assert outs["reader"] == outs["device"]
