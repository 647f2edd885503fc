"""Where tiles are taken from: training origin cells under the nodata limit, evaluation grid tiles.

Both read a scene's validity map (:mod:`geobp.data.validity`) only, never its pixels; class
balance reweights the training cells afterwards (:mod:`geobp.data.classbalance`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rasterio.windows import Window

from geobp.data.dataset import TileSpec
from geobp.data.preprocessing import window_valid_fraction
from geobp.data.samplers import SceneCells, window_to_spec
from geobp.data.scenes import Scene
from geobp.tiling import TilingOptions, cell_window, grid_windows, origin_cells


def train_places(
    scenes: Sequence[Scene], regions: Sequence[tuple[int, Window]], tile_size: int,
    validity: Sequence[np.ndarray], min_valid: float,
) -> tuple[list[SceneCells], list[list[Window]]]:
    """Block-aligned origin cells of the training regions whose tiles hold at least ``min_valid``
    valid pixels, weighted by their number of origins; and the window each cell's tiles cover.

    Args:
        scenes: the dataset's scenes.
        regions: the training split's (scene index, window) regions.
        tile_size: tile side in pixels.
        validity: per scene, its validity map.
        min_valid: the least valid share of a cell's window.

    Returns:
        (cells per scene with a training region, same order: the windows of their cells).
    """
    by_scene: dict[int, tuple[SceneCells, list[Window]]] = {}
    for i, region in regions:
        info = scenes[i].image
        sc, windows = by_scene.setdefault(i, (SceneCells(i, info.height, info.width, [], []), []))
        for cell in origin_cells(region, tile_size, info.block_height, info.block_width):
            window = cell_window(cell, tile_size, region)
            if window_valid_fraction(validity[i], window) >= min_valid:
                sc.cells.append(cell)
                sc.weights.append(float(cell.count))
                windows.append(window)
    return [sc for sc, _ in by_scene.values()], [w for _, w in by_scene.values()]


def grid_tiles(
    scenes: Sequence[Scene], regions: Sequence[tuple[int, Window]], tiling: TilingOptions, validity: Sequence[np.ndarray]
) -> list[TileSpec]:
    """Grid tiles (``tiling``'s size and overlap) covering ``regions``; tiles with no valid pixel are left out."""
    tiles = []
    for i, region in regions:
        info = scenes[i].image
        for w in grid_windows(info.height, info.width, tiling.tile_size, tiling.overlap, region):
            if window_valid_fraction(validity[i], w) > 0:
                tiles.append(window_to_spec(i, w))
    return tiles
