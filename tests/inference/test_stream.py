"""Streaming internals of inference: tile grid, blender (exactness, bounded memory), strip writer, reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geobp.data.preprocessing import Preprocessing
from geobp.inference import predict as predict_mod
from geobp.inference.blend import TileBlender
from geobp.inference import sinks as sinks_mod
from geobp.inference.options import PredictOptions
from geobp.inference.predict import predict_raster
from geobp.inference.reader import PrefetchReader
from geobp.inference.sinks import SINKS, BlockRows, OutputLayout, output_sinks
from geobp.tiling import TileGrid
from tests.conftest import write_tif

K = 3


def dense_blend(grid: TileGrid, tile_probs: dict) -> np.ndarray:
    """Reference: the whole raster at once, sum of weighted tiles."""
    acc = np.zeros((K, grid.height, grid.width))
    for (i, j), p in tile_probs.items():
        r, c = grid.row_offsets[i], grid.col_offsets[j]
        w = np.outer(grid.row_weights[i], grid.col_weights[j])
        acc[:, r : r + grid.tile_h, c : c + grid.tile_w] += p * w
    return acc


def encoders(probabilities: str, height: int = 1, width: int = 1) -> list:
    """``(encode, bands)`` of the sinks of ``probabilities``, as predict_raster gives the blender."""
    layout = OutputLayout({"height": height, "width": width}, [f"c{k}" for k in range(K)])
    return [(s.encode, s.bands(layout)) for s in output_sinks("x_classes.tif", PredictOptions(probabilities=probabilities))]


def stream(grid: TileGrid, tile_probs: dict, valid_fn=None, backend="numpy"):
    """Feed the blender in row-major order; return the assembled uint8 output and the blender.

    The bands: the class ids, K probabilities, their mask. backend "torch" feeds torch
    tensors, as on a GPU (here on the CPU).
    """
    blender = TileBlender(grid, encoders("probs"))
    out = np.zeros((2 + K, grid.height, grid.width), np.uint8)
    next_row = 0
    for i, j in grid.tiles():
        p = tile_probs[(i, j)] * np.outer(grid.row_weights[i], grid.col_weights[j])
        valid = np.ones((grid.tile_h, grid.tile_w), bool) if valid_fn is None else valid_fn(i, j)
        p = p.astype(np.float32)
        if backend == "torch":  # inference tensors, as the model thread makes them
            with torch.inference_mode():
                p, valid = torch.from_numpy(p).clone(), torch.from_numpy(valid).clone()
        done = blender.add(i, j, p, valid)
        if done is not None:
            row, strip = done
            if backend == "torch":
                assert isinstance(strip, torch.Tensor) and strip.dtype == torch.uint8
                strip = strip.numpy()
            assert row == next_row and strip.shape[2] == grid.width
            out[:, row : row + strip.shape[1]] = strip
            next_row = row + strip.shape[1]
    assert next_row == grid.height and blender.done and blender.buffered == 0
    return out, blender


def random_tiles(grid: TileGrid, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    probs = {}
    for t in grid.tiles():
        p = rng.random((K, grid.tile_h, grid.tile_w))
        probs[t] = p / p.sum(0)
    return probs


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(
    "h,w,tile,overlap",
    [(50, 70, 16, 8), (50, 70, 24, 4), (37, 41, 16, 0), (33, 20, 16, 12), (5, 3, 16, 4), (100, 30, 30, 29)],
)
def test_blender_equals_dense_blend(h, w, tile, overlap, backend):
    # arbitrary (not equivariant) tile predictions: streaming must equal summing everything at once,
    # including overlaps larger than half a tile (three tiles per pixel along an axis)
    grid = TileGrid.build(h, w, tile, overlap)
    tiles = random_tiles(grid)
    out, _ = stream(grid, tiles, backend=backend)
    want = dense_blend(grid, tiles)
    np.testing.assert_array_equal(out[0], want.argmax(0))
    assert np.abs(out[1:-1].astype(int) - np.rint(want * 255)).max() <= 1
    assert (out[-1] == 255).all()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_blender_applies_validity_per_cell(backend):
    grid = TileGrid.build(40, 40, 16, 4)
    invalid = np.zeros((40, 40), bool)
    invalid[10:20, 5:33] = True

    def valid_fn(i, j):
        r, c = grid.row_offsets[i], grid.col_offsets[j]
        return ~invalid[r : r + 16, c : c + 16]

    out, _ = stream(grid, random_tiles(grid), valid_fn, backend=backend)
    assert (out[0][invalid] == 255).all() and (out[0][~invalid] < K).all()
    assert (out[1:, invalid] == 0).all()
    assert (out[-1][~invalid] == 255).all()  # the mask


def test_blender_memory_does_not_grow_with_height_and_stays_below_one_band():
    # the blender keeps only the overlap band under the current tile row (plus a column piece),
    # never a full tile row, and the same amount however tall the raster is
    tile, overlap, width = 16, 4, 64
    peaks = []
    for height in (64, 256, 1024):
        grid = TileGrid.build(height, width, tile, overlap)
        _, blender = stream(grid, random_tiles(grid))
        peaks.append(blender.peak_buffered)
    assert peaks[0] == peaks[1] == peaks[2]
    n_cols = len(TileGrid.build(64, width, tile, overlap).col_offsets)
    bound = K * (overlap * n_cols * tile + tile * tile)
    assert peaks[0] <= bound < K * (tile + tile - overlap) * width / 2


class _RecordingBlender(TileBlender):
    instances: list[TileBlender] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.instances.append(self)


def test_memory_bound_in_an_instrumented_run(tmp_path, monkeypatch):
    """A real run over a tall raster: the accumulator holds far less than (tile + stride) rows."""
    monkeypatch.setattr(predict_mod, "TileBlender", _RecordingBlender)
    written = []
    original = sinks_mod.GeoTiffSink.write

    def spy(self, row, strip):
        original(self, row, strip)
        written.append(self.rows.peak_pending_rows)

    monkeypatch.setattr(sinks_mod.GeoTiffSink, "write", spy)
    tile, overlap, height, width = 32, 8, 700, 200
    rng = np.random.default_rng(0)
    src = write_tif(tmp_path / "tall.tif", rng.integers(1, 1000, (3, height, width)).astype("uint16"), nodata=0)
    pre = Preprocessing(bands=[1, 2, 3], nodata=0, mean=[500.0] * 3, std=[300.0] * 3)
    model = torch.nn.Conv2d(3, K, 1)
    predict_raster(model, src, tmp_path / "tall_classes.tif", pre, tile_size=tile, overlap=overlap, progress=False)
    blender = _RecordingBlender.instances[-1]
    grid = blender.grid
    stride = tile - overlap
    rows = grid.row_offsets
    carried = max(rows[i] + tile - rows[i + 1] for i in range(len(rows) - 1))  # 12: the clamped last row
    assert blender.peak_buffered <= K * (carried * len(grid.col_offsets) * tile + 2 * tile * tile)
    assert blender.peak_buffered <= K * (tile + stride) * width / 2
    # uint8 rows waiting for a whole block row: less than one block plus one strip
    assert max(written) < 256 + stride


def test_block_rows_hand_out_whole_block_rows_in_order():
    rows = BlockRows(block_height=16, height=40)
    assert list(rows.add(0, np.zeros((1, 5, 8), np.uint8))) == []
    with pytest.raises(RuntimeError, match="strips out of order: expected row 5, got 6"):
        list(rows.add(6, np.zeros((1, 5, 8), np.uint8)))
    got = list(rows.add(5, np.arange(1 * 20 * 8, dtype=np.uint8).reshape(1, 20, 8)))
    assert [(r, d.shape[1]) for r, d in got] == [(0, 16)] and not rows.complete
    got = list(rows.add(25, np.zeros((1, 15, 8), np.uint8)))  # the last rows go out whole or not
    assert [(r, d.shape[1]) for r, d in got] == [(16, 24)] and rows.complete


def test_blender_refuses_out_of_order():
    grid = TileGrid.build(32, 32, 16, 4)
    blender = TileBlender(grid, encoders("none"))
    with pytest.raises(RuntimeError, match=r"tiles out of order: expected \(0, 0\), got \(0, 1\)"):
        blender.add(0, 1, np.zeros((K, 16, 16), np.float32), np.ones((16, 16), bool))


def test_reader_batches_in_order_with_padding_and_validity(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(1, 1000, (2, 10, 40)).astype("uint16")
    img[:, 0, :5] = 0
    src = write_tif(tmp_path / "a.tif", img, nodata=0, block=None)
    pre = Preprocessing(bands=[2, 1], nodata=0, mean=[0.0, 0.0], std=[1.0, 1.0])
    grid = TileGrid.build(10, 40, 16, 4)  # rows shorter than a tile: padded by reflection
    batches = grid.batches(3)
    with PrefetchReader(src, grid, batches, pre, num_workers=2, prefetch=2) as reader:
        got = list(reader)
    assert [b.tiles for b in got] == batches
    first = got[0]
    assert first.image.shape == (3, 2, 16, 16) and first.valid.shape == (3, 10, 16)
    np.testing.assert_array_equal(first.image[0, 0, :10].numpy(), img[1, :, :16])  # band order [2, 1]
    np.testing.assert_array_equal(first.image[0, :, 10].numpy(), first.image[0, :, 8].numpy())  # reflect
    assert not first.valid[0, 0, :5].any() and first.valid[0, 1:].all()
    assert first.valid.dtype == torch.bool
    # tile (0, 1) starts at column 12
    np.testing.assert_array_equal(first.image[1, 1, :10].numpy(), img[0, :, 12:28])


@pytest.mark.parametrize("name", sorted(SINKS))
def test_numpy_and_torch_encodings_agree(name, tmp_path):
    rng = np.random.default_rng(3)
    p = rng.random((K, 9, 11)).astype(np.float32)
    p /= p.sum(0)
    p[:, 0, 0] = [0.5 / 255, 1.5 / 255, 1 - 2 / 255]  # halves: both round them to even
    valid = rng.random((9, 11)) > 0.2
    sink = SINKS[name].make(tmp_path / "x.tif", PredictOptions())
    layout = OutputLayout({"height": 9, "width": 11}, [f"c{k}" for k in range(K)])
    before = p.copy()
    a = sink.encode(p, valid)
    b = sink.encode(torch.from_numpy(p), torch.from_numpy(valid)).numpy()
    np.testing.assert_array_equal(p, before)  # the other sinks encode the same cell
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape == (sink.bands(layout), 9, 11)
    assert sink.bands(layout) == {"classes": 1, "probs": K + 1, "confidence": 2, "entropy": 1}[name]
    np.testing.assert_array_equal(a, b)
    if name == "classes":
        assert (a[0][~valid] == 255).all() and (a[0][valid] == p.argmax(0)[valid]).all()
    elif name == "entropy":  # one band, 0..254, nodata 255
        assert (a[0][~valid] == 255).all() and (a[0][valid] <= 254).all()
    else:
        assert (a[:-1, ~valid] == 0).all() and (a[-1] == np.where(valid, 255, 0)).all()
