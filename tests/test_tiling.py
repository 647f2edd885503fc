import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from geobp.errors import ConfigError
from geobp.tiling import (
    TilingOptions, cell_window, draw_origin, grid_offsets, grid_windows, origin_cells, origin_ranges, split_blocks,
)


def as_tuples(windows):
    return {(int(w.row_off), int(w.col_off), int(w.height), int(w.width)) for w in windows}


def test_grid_windows_exact_set_with_clamped_edge():
    # 10 x 7 raster, tile 4, no overlap: rows at 0, 4, 6 (clamped), cols at 0, 3 (clamped)
    got = as_tuples(grid_windows(10, 7, 4))
    want = {(r, c, 4, 4) for r in (0, 4, 6) for c in (0, 3)}
    assert got == want


def test_grid_windows_overlap_exact_set():
    got = as_tuples(grid_windows(8, 8, 4, overlap=2))
    assert got == {(r, c, 4, 4) for r in (0, 2, 4) for c in (0, 2, 4)}


def test_grid_windows_smaller_than_tile_gives_one_clamped_window():
    assert as_tuples(grid_windows(5, 3, 8)) == {(0, 0, 5, 3)}


def test_grid_windows_region_stays_inside_region():
    region = Window(10, 20, 9, 6)  # col 10, row 20, width 9, height 6
    got = as_tuples(grid_windows(100, 100, 4, region=region))
    assert got == {(r, c, 4, 4) for r in (20, 22) for c in (10, 14, 15)}


@pytest.mark.parametrize("tile,overlap,match", [
    (0, 0, r"tile size must be positive \(found 0\)\. Fix: set tile_size >= 1"),
    (4, 4, r"overlap must be in \[0, tile size\) \(tile 4, found overlap 4\)\. Fix: set overlap smaller than tile_size"),
    (4, -1, r"overlap must be in \[0, tile size\) \(tile 4, found overlap -1\)"),
])
def test_bad_tile_options(tile, overlap, match):
    with pytest.raises(ConfigError, match=match):
        TilingOptions(tile, overlap)


def test_tile_options_keep_good_values_and_one_default():
    assert TilingOptions(4, 3) == TilingOptions(tile_size=4, overlap=3)
    assert (TilingOptions().tile_size, TilingOptions().overlap) == (256, 0)


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 70),
    w=st.integers(1, 70),
    tile=st.integers(1, 32),
    overlap_frac=st.floats(0, 0.95),
)
def test_grid_covers_every_pixel_and_nothing_outside(h, w, tile, overlap_frac):
    overlap = min(int(tile * overlap_frac), tile - 1)
    covered = np.zeros((h, w), dtype=int)
    for win in grid_windows(h, w, tile, overlap):
        r, c, wh, ww = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        assert r >= 0 and c >= 0 and r + wh <= h and c + ww <= w
        assert wh == min(tile, h) and ww == min(tile, w)
        covered[r : r + wh, c : c + ww] += 1
    assert (covered > 0).all()


def test_grid_offsets_stride():
    assert grid_offsets(10, 4, 4) == [0, 4, 6]
    assert grid_offsets(8, 4, 4) == [0, 4]
    assert grid_offsets(3, 4, 4) == [0]


def test_origin_ranges_keep_tiles_inside_one_block():
    # blocks of 16 on a 40 px axis, tiles of 8: origins 0..8 (block 0), 16..24 (block 1), 32 (edge)
    assert origin_ranges(0, 40, 8, 16) == [(0, 8), (16, 24), (32, 32)]


def test_origin_ranges_large_tiles_start_on_block_boundaries():
    assert origin_ranges(0, 64, 32, 16) == [(0, 0), (16, 16), (32, 32)]


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 300),
    lo_frac=st.floats(0, 0.5),
    tile=st.integers(1, 64),
    block=st.sampled_from([1, 16, 32, 64, 128, 300]),
)
def test_origin_ranges_properties(n, lo_frac, tile, block):
    lo = int(n * lo_frac)
    hi = n
    ranges = origin_ranges(lo, hi, tile, block)
    last = max(hi - tile, lo)
    for a, b in ranges:
        assert lo <= a <= b <= last
        if hi - lo > tile and a != last:
            # an aligned origin never makes a tile cross more blocks than needed
            blocks = (a + tile - 1) // block - a // block + 1
            assert blocks <= -(-tile // block)
    # the tile flush with the end is always reachable, so edge pixels are sampled
    assert any(a <= last <= b for a, b in ranges)


def test_origin_cells_and_draw_stay_in_region():
    region = Window(0, 0, 50, 40)
    cells = origin_cells(region, 8, 16, 16)
    rng = np.random.default_rng(0)
    for cell in cells:
        win = cell_window(cell, 8, region)
        assert win.row_off + win.height <= 40 and win.col_off + win.width <= 50
        for _ in range(5):
            r, c = draw_origin(rng, cell)
            assert 0 <= r <= 32 and 0 <= c <= 42


def test_split_blocks_partition_and_reproducible():
    a = split_blocks(100, 130, 32, (0.6, 0.2, 0.2), seed=1, key="s1")
    b = split_blocks(100, 130, 32, (0.6, 0.2, 0.2), seed=1, key="s1")
    assert [as_tuples(x) for x in a] == [as_tuples(x) for x in b]
    all_blocks = [t for part in a for t in as_tuples(part)]
    assert len(all_blocks) == len(set(all_blocks)) == 4 * 5
    assert all(len(part) > 0 for part in a)
    covered = np.zeros((100, 130), dtype=int)
    for r, c, h, w in all_blocks:
        covered[r : r + h, c : c + w] += 1
    assert (covered == 1).all()
    c = split_blocks(100, 130, 32, (0.6, 0.2, 0.2), seed=1, key="s2")
    assert [as_tuples(x) for x in a] != [as_tuples(x) for x in c]
