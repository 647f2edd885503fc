"""Train/validation/test splits of the scenes: whole scenes, or square blocks within every scene."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from rasterio.windows import Window

from geobp.data.options import SplitOptions
from geobp.data.scenes import Scene
from geobp.errors import ConfigError, format_error
from geobp.tiling import split_blocks

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
#: Per split, the (scene index, window) regions it covers.
Regions = dict[Split, list[tuple[int, Window]]]


def split_regions(scenes: list[Scene], options: SplitOptions, seed: int, root: str | Path | None = None) -> Regions:
    """The regions of each split, reproducibly from ``seed``.

    ``split: scene`` draws whole scenes for validation and test (at least one each when its
    fraction is positive); ``split: blocks`` assigns square blocks of every scene
    (:func:`geobp.tiling.split_blocks`), so that correlated neighbouring pixels stay in one split.

    Args:
        scenes: the dataset's scenes.
        options: split mode, fractions and block size.
        seed: seed of the draw.
        root: the dataset folder, named in errors.

    Returns:
        Per split, (scene index, window) pairs.

    Raises:
        ConfigError: too few scenes for a split by scene with these fractions.
    """
    fractions = options.fractions
    regions: Regions = {s: [] for s in SPLITS}
    if options.split == "scene":
        n = len(scenes)
        counts = [int(round(f * n)) if f > 0 else 0 for f in fractions[1:]]
        counts = [max(c, 1) if f > 0 else 0 for c, f in zip(counts, fractions[1:])]
        if n - sum(counts) < 1:
            raise ConfigError(
                format_error(
                    root,
                    f"{n} scene(s) cannot be split by scene into train/val/test with fractions {fractions}",
                    "add scenes, lower the fractions, or set data.split: blocks to split within scenes",
                )
            )
        order = np.random.default_rng(seed).permutation(n).tolist()
        val, test = order[: counts[0]], order[counts[0] : counts[0] + counts[1]]
        for i, s in enumerate(scenes):
            split: Split = "val" if i in val else "test" if i in test else "train"
            regions[split].append((i, Window(0, 0, s.image.width, s.image.height)))
    else:
        for i, s in enumerate(scenes):
            parts = split_blocks(s.image.height, s.image.width, options.split_block_size, fractions, seed, s.name)
            for split, windows in zip(SPLITS, parts):
                regions[split] += [(i, w) for w in windows]
    return regions
