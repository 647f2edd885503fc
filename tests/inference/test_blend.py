"""Blend weights for sliding-window inference (geobp.tiling)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geobp.tiling import BLEND_EPS, axis_blend_weights, blend_weights, blend_weights_1d, grid_offsets, spread_offsets


def test_blend_weights_2d_smooth_positive_symmetric():
    w = blend_weights(64, 16)
    assert w.shape == (64, 64) and w.dtype == np.float32
    assert w.min() >= 0.99 * BLEND_EPS**2 and w.max() == pytest.approx(1.0)
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])
    assert w[32, 32] == pytest.approx(1.0)
    # tapers towards the edges, and smoothly: no jump larger than a few percent between pixels
    assert w[0, 32] == pytest.approx(BLEND_EPS, rel=1e-3)
    assert np.abs(np.diff(w, axis=1)).max() < 0.2


def test_blend_weights_1d_complementary_over_exact_overlap():
    # two tiles overlapping by exactly `overlap` pixels sum to ~1 across the overlap
    tile, overlap = 32, 8
    w = blend_weights_1d(tile, overlap)
    np.testing.assert_allclose(w[-overlap:] + w[:overlap], 1.0, atol=2 * BLEND_EPS)


def test_blend_weights_1d_untapered_ends_are_flat():
    w = blend_weights_1d(16, 8, taper_start=False, taper_end=True)
    assert (w[:8] == 1).all() and w[-1] < 1e-3
    assert (blend_weights_1d(16, 0) == 1).all()


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 300), tile=st.integers(1, 64), data=st.data())
def test_axis_blend_weights_partition_of_unity(length, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    offsets, weights = axis_blend_weights(length, tile, overlap)
    span = min(tile, length)
    assert offsets == spread_offsets(length, tile, overlap)
    assert weights.shape == (len(offsets), span) and weights.dtype == np.float32
    assert (weights > 0).all()
    total = np.zeros(length)
    for off, w in zip(offsets, weights):
        total[off : off + span] += w
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)


def test_axis_blend_weights_border_tiles_keep_full_weight():
    offsets, weights = axis_blend_weights(100, 32, 8)
    # raster borders are covered by one tile only: weight exactly 1, nothing tapered away
    assert weights[0, 0] == pytest.approx(1.0) and weights[-1, -1] == pytest.approx(1.0)
    # tile edges inside the raster get (almost) nothing: the neighbour takes over
    assert weights[0, -1] < 1e-3 and weights[1, 0] < 1e-3


@settings(max_examples=100, deadline=None)
@given(length=st.integers(1, 2000), tile=st.integers(1, 300), data=st.data())
def test_spread_offsets_even_overlaps_inside_raster(length, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    offsets = spread_offsets(length, tile, overlap)
    assert len(offsets) == len(grid_offsets(length, tile, tile - overlap))  # no extra tiles
    assert offsets[0] == 0 and offsets == sorted(set(offsets))
    if length <= tile:
        assert offsets == [0]
        return
    assert offsets[-1] == length - tile  # covers the end, stays inside
    gaps = np.diff(offsets)
    assert gaps.max() <= tile - overlap  # overlap at least `overlap`: every pixel covered
    assert gaps.max() - gaps.min() <= 1  # spread evenly: no big clamped last overlap


def test_spread_offsets_exact():
    # grid_offsets would give 0, 6, 12, 18, 20 (last overlap 8); spread gives gaps of 5
    assert grid_offsets(30, 10, 6) == [0, 6, 12, 18, 20]
    assert spread_offsets(30, 10, 4) == [0, 5, 10, 15, 20]
