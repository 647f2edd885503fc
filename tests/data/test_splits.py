"""Splits of the scenes, from a SplitOptions group: whole scenes, or blocks within every scene."""

from __future__ import annotations

import pytest

from geobp.data.options import SplitOptions
from geobp.data.scenes import Scene
from geobp.data.splits import SPLITS, split_regions
from geobp.errors import ConfigError
from geobp.raster import RasterInfo


def scene(name: str, height: int = 100, width: int = 130) -> Scene:
    info = RasterInfo(path=f"{name}.tif", width=width, height=height, count=3, dtype="uint16", crs="EPSG:32633",
                      transform=(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), nodata=None, block_height=16, block_width=16)
    return Scene(name, info, info)


def pixels(regions, i: int) -> set[tuple[int, int]]:
    """Every (row, col) of scene ``i`` in ``regions``."""
    out: set[tuple[int, int]] = set()
    for j, w in regions:
        if j == i:
            out |= {(r, c) for r in range(w.row_off, w.row_off + w.height) for c in range(w.col_off, w.col_off + w.width)}
    return out


def test_split_by_scene_takes_whole_scenes_reproducibly():
    scenes = [scene(f"s{i}") for i in range(5)]
    options = SplitOptions(val_fraction=0.2, test_fraction=0.2)
    regions = split_regions(scenes, options, seed=3)
    assert [len(regions[s]) for s in SPLITS] == [3, 1, 1]
    assert sorted(i for s in SPLITS for i, _ in regions[s]) == [0, 1, 2, 3, 4]
    assert all((w.row_off, w.col_off, w.height, w.width) == (0, 0, 100, 130) for s in SPLITS for _, w in regions[s])
    assert split_regions(scenes, options, seed=3) == regions


def test_split_by_blocks_partitions_every_scene():
    scenes = [scene("a"), scene("b", 40, 70)]
    regions = split_regions(scenes, SplitOptions(split="blocks", val_fraction=0.3, split_block_size=32), seed=1)
    for i, s in enumerate(scenes):
        parts = [pixels(regions[split], i) for split in SPLITS]
        assert sum(len(p) for p in parts) == s.image.height * s.image.width  # disjoint ...
        assert set().union(*parts) == {(r, c) for r in range(s.image.height) for c in range(s.image.width)}  # ... and covering
    assert regions["val"] and not regions["test"]


def test_too_few_scenes_for_a_split_by_scene_names_the_fix():
    with pytest.raises(ConfigError, match=r"data: 2 scene\(s\) cannot be split by scene .*Fix: add scenes, lower the fractions, or set data.split: blocks"):
        split_regions([scene("a"), scene("b")], SplitOptions(val_fraction=0.3, test_fraction=0.3), seed=0, root="data")
