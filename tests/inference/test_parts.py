"""A raster predicted in shares of tile rows (as several processes do) gives the single-process bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from geobp.inference import output_paths, predict_raster
from geobp.inference.parts import part_path, remove_parts, share_rows, write_from_parts
from geobp.inference.predict import PredictOptions, open_job, predict_share
from geobp.inference.sinks import OutputLayout, output_sinks
from geobp.tiling import TileGrid
from tests.inference.test_predict import PRE, conv_model, make_image


def small_cnn() -> torch.nn.Module:
    """Two 3x3 convolutions: neighbouring pixels interact, so blending across shares matters."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1)).eval()


def predict_in_shares(model, src: Path, dst: Path, world: int, **kw) -> list:
    """What `geobp infer` does on `world` processes, run one share after the other."""
    opts = PredictOptions(tile_size=kw["tile_size"], overlap=kw["overlap"], batch_size=kw["batch_size"], progress=False,
                          probabilities=kw.get("probabilities", "none"))
    job = open_job(src, PRE, opts)
    shares = share_rows(job.grid, world)
    for share in shares:  # each process makes its own sinks
        predict_share(model, job, share, output_sinks(dst, opts), opts)
    write_from_parts(output_sinks(dst, opts), job.grid, shares, OutputLayout(job.profile, [f"class_{i}" for i in range(4)]))
    remove_parts(output_paths(dst, opts.probabilities).values(), world)
    return shares


@pytest.mark.parametrize(
    ("size", "tile", "overlap", "batch", "world", "probabilities", "cnn"),
    [
        ((70, 50), 16, 8, 3, 2, "none", True),  # batches straddle the share boundary
        ((100, 37), 16, 4, 5, 3, "probs", True),
        ((90, 60), 32, 16, 4, 4, "confidence", False),  # overlap of half a tile
        ((64, 64), 16, 12, 2, 2, "none", True),  # overlap above half a tile: two warm-up rows
    ],
)
def test_shares_give_the_same_bytes_as_one_process(tmp_path, size, tile, overlap, batch, world, probabilities, cnn):
    model = small_cnn() if cnn else conv_model()
    src = make_image(tmp_path / "in.tif", size=size)
    kw = {"tile_size": tile, "overlap": overlap, "batch_size": batch, "probabilities": probabilities}
    one = tmp_path / "one" / "in_classes.tif"
    predict_raster(model, src, one, PRE, progress=False, num_classes=4, **kw)
    many = tmp_path / "many" / "in_classes.tif"
    shares = predict_in_shares(model, src, many, world, **kw)
    assert len(shares) == world
    for key, path in output_paths(one, probabilities).items():
        other = output_paths(many, probabilities)[key]
        assert path.read_bytes() == other.read_bytes(), key
    assert sorted(p.name for p in many.parent.iterdir()) == sorted(p.name for p in one.parent.iterdir())  # no parts left


def test_share_rows_cover_every_tile_row_once_with_warmup_for_the_overlap():
    grid = TileGrid.build(200, 40, 32, 8)
    n = len(grid.row_offsets)
    shares = share_rows(grid, 3)
    assert [(s.start, s.stop) for s in shares] == [(0, n // 3), (n // 3, 2 * n // 3), (2 * n // 3, n)]
    assert shares[0].warmup == 0
    for s in shares[1:]:
        # the row above reaches into the share's first cells, the one above that does not
        assert s.warmup == s.start - 1
        assert grid.row_offsets[s.warmup] + 32 > grid.row_offsets[s.start]
    # more processes than tile rows: the extra ones get nothing
    tiny = TileGrid.build(40, 40, 32, 8)
    assert [(s.rank, s.start, s.stop) for s in share_rows(tiny, 4)] == [(1, 0, 1), (3, 1, 2)]


def test_failed_share_leaves_no_part(tmp_path):
    src = make_image(tmp_path / "in.tif", size=(64, 40))
    opts = PredictOptions(tile_size=16, overlap=4, batch_size=2, progress=False)
    job = open_job(src, PRE, opts)
    share = share_rows(job.grid, 2)[1]

    class Boom(torch.nn.Module):
        """Fails on its third batch, once the part file holds rows."""

        def __init__(self):
            super().__init__()
            self.conv, self.calls = conv_model(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return self.conv(x)

    dst = tmp_path / "out" / "in_classes.tif"
    dst.parent.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        predict_share(Boom(), job, share, output_sinks(dst, opts), opts)
    assert list(dst.parent.iterdir()) == []


def test_missing_part_is_an_error_and_writes_nothing(tmp_path):
    src = make_image(tmp_path / "in.tif", size=(64, 40))
    opts = PredictOptions(tile_size=16, overlap=4, progress=False)
    job = open_job(src, PRE, opts)
    shares = share_rows(job.grid, 2)
    dst = tmp_path / "out" / "in_classes.tif"
    dst.parent.mkdir()
    assert predict_share(conv_model(), job, shares[0], output_sinks(dst, opts), opts) == [part_path(dst, 0)]
    with pytest.raises(FileNotFoundError):
        write_from_parts(output_sinks(dst, opts), job.grid, shares, OutputLayout(job.profile, ["a", "b", "c", "d"]))
    assert [p.name for p in dst.parent.iterdir()] == [part_path(dst, 0).name]
    np.load(part_path(dst, 0))  # the part that was written is a readable array
