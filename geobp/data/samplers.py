"""Tile samplers that shard by rank: random block-aligned tiles for training, a grid for evaluation.

Both subclass :class:`~torch.utils.data.DistributedSampler` so that Lightning neither wraps nor
replaces them under DDP, and both honour ``set_epoch``. They yield :class:`TileSpec` values,
which :class:`~geobp.data.dataset.TileDataset` reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window
from torch.utils.data import DistributedSampler

from geobp.data.dataset import TileSpec
from geobp.tiling import OriginCell, draw_origin


@dataclass(frozen=True)
class SceneCells:
    """Where random tiles may start in one scene: block-aligned origin cells and their weights."""

    scene: int
    height: int
    width: int
    cells: list[OriginCell]
    weights: list[float]


class _RankSampler(DistributedSampler):
    """Shared rank/epoch bookkeeping; deliberately skips DistributedSampler's dataset-based init."""

    def __init__(self, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.shuffle = False
        self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch; changes the random draw."""
        self.epoch = epoch

    def _share(self, total: int) -> int:
        return len(range(self.rank, total, self.num_replicas))


class RandomTileSampler(_RankSampler):
    """Random tiles, ``length`` per epoch across all ranks; rank r takes draws r, r+R, r+2R, ...

    Origins are drawn cell by cell (a cell's tiles decode the same file blocks), cells chosen
    with probability proportional to their weight: the number of origins, so that every origin in
    every scene is equally likely, times a class-balance factor under ``sampling: balanced``
    (:func:`geobp.data.classbalance.balance_factors`); origins within a cell are uniform. The
    draw depends only on (seed, epoch), so all ranks agree on it and take disjoint shares.

    ``start`` skips the first tiles of this rank's share in the next iteration only (then it returns
    to 0): a run resumed mid-epoch continues the epoch's draw where it stopped instead of replaying
    its first tiles. The length stays the whole share, as Lightning counts the epoch's batches
    from it.
    """

    def __init__(
        self,
        scenes: Sequence[SceneCells],
        tile_size: int,
        length: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(num_replicas, rank, seed)
        self.scenes = [s for s in scenes if s.cells]
        if not self.scenes:
            raise ValueError("no scene has a place to draw training tiles from")
        self.tile_size = tile_size
        self.length = length
        flat = [(i, j) for i, s in enumerate(self.scenes) for j in range(len(s.cells))]
        w = np.array([self.scenes[i].weights[j] for i, j in flat], dtype=np.float64)
        self._flat = flat
        self._p = w / w.sum()
        self.start = 0

    def draw(self, epoch: int) -> list[TileSpec]:
        """All ``length`` tiles of an epoch (every rank's), in order."""
        rng = np.random.default_rng([self.seed, epoch])
        picks = rng.choice(len(self._flat), size=self.length, p=self._p)
        # augmentation seeds from a generator of their own: the windows do not depend on them
        aug_seeds = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2**31, size=self.length)
        out = []
        for k, aug_seed in zip(picks, aug_seeds.tolist()):
            i, j = self._flat[k]
            s = self.scenes[i]
            row, col = draw_origin(rng, s.cells[j])
            out.append(
                TileSpec(s.scene, row, col, min(self.tile_size, s.height - row), min(self.tile_size, s.width - col), aug_seed)
            )
        return out

    def __iter__(self) -> Iterator[TileSpec]:
        start, self.start = self.start, 0
        return iter(self.draw(self.epoch)[self.rank :: self.num_replicas][start:])

    def __len__(self) -> int:
        return self._share(self.length)


class GridTileSampler(_RankSampler):
    """A fixed list of tiles (a grid), split between ranks without padding or duplicates."""

    def __init__(self, tiles: Sequence[TileSpec], num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(num_replicas, rank)
        self.tiles = list(tiles)

    def __iter__(self) -> Iterator[TileSpec]:
        return iter(self.tiles[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self._share(len(self.tiles))


def window_to_spec(scene: int, window: Window) -> TileSpec:
    """A grid window as a :class:`TileSpec`."""
    return TileSpec(scene, int(window.row_off), int(window.col_off), int(window.height), int(window.width))


@dataclass(frozen=True)
class Redraw:
    """Read-time rejection of training tiles for scenes whose validity is not known at start-up.

    A scene without a mask band or overviews, whose nodata only a full decode would find, can
    be left unscanned (``data.validity: at_read``): its places are drawn as if fully valid, and
    the dataset, having read a tile with less than ``min_valid`` valid pixels, reads a
    replacement drawn by :meth:`replace` from the same scene's cells, up to ``tries`` times (then
    the last tile is kept: its nodata pixels are ignored by the loss anyway). A scene with a
    third of its places valid then passes a tile with too much nodata once in 1,000 draws, and
    costs three reads per tile on average. The replacement
    depends only on the rejected tile and the attempt, so it is the same in any worker, rank or
    resumed run.
    """

    scenes: dict[int, SceneCells]
    tile_size: int
    min_valid: float
    seed: int = 0
    tries: int = 16

    def replace(self, spec: TileSpec, attempt: int) -> TileSpec:
        """The tile read instead of the rejected ``spec`` on its ``attempt``-th retry (1-based)."""
        s = self.scenes[spec.scene]
        rng = np.random.default_rng([self.seed, spec.scene, spec.row, spec.col, attempt])
        w = np.asarray(s.weights, dtype=np.float64)
        cell = s.cells[int(rng.choice(len(w), p=w / w.sum()))]
        row, col = draw_origin(rng, cell)
        t = self.tile_size
        return TileSpec(s.scene, row, col, min(t, s.height - row), min(t, s.width - col), spec.aug_seed)
