"""One raster predicted by several processes: shares of tile rows, part files, and their assembly.

A raster is cut into contiguous runs of tile rows, one per process (:func:`share_rows`). A
process predicts its rows and writes the finished, encoded uint8 strips to a part file
(:class:`PartSink`, a ``.npy`` file beside the outputs); rank 0 then writes the outputs from the
parts (:func:`write_from_parts`), strip by strip in the order a single process writes them.

To give the same bytes as a single process:

- the first cells of a share also hold contributions from the tile row above it (the overlap),
  so a share starts predicting one or more rows earlier (``warmup``) and discards those rows'
  strips (which lack contributions from further up);
- a share runs the same batches as a single process (``TileGrid.batches``), tiles of other
  shares included, so that every tile's logits come from the same forward pass, and it blends
  them in the same order.

The warm-up rows are the cost: one tile row per process boundary (when the overlap is below
half a tile).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geobp.inference.outputs import (
    OutputFiles,
    Probabilities,
    atomic_output,
    check_outputs_free,
    output_paths,
)
from geobp.tiling import TileGrid


@dataclass(frozen=True)
class RowShare:
    """Tile rows ``[start, stop)`` of a raster, predicted from row ``warmup`` on.

    Attributes:
        rank: the process that predicts this share.
        start, stop: tile rows whose output rows this share writes.
        warmup: first tile row predicted (``<= start``): rows before ``start`` only complete
            the blend of the first cells.
    """

    rank: int
    start: int
    stop: int
    warmup: int

    def rows(self, grid: TileGrid) -> tuple[int, int]:
        """Raster rows ``[first, end)`` this share writes."""
        edges = [*grid.row_offsets, grid.height]
        return edges[self.start], edges[self.stop]


def share_rows(grid: TileGrid, world: int) -> list[RowShare]:
    """Split the grid's tile rows into ``world`` contiguous shares, as even as whole rows allow.

    A process whose share would be empty (fewer tile rows than processes) gets none: the list
    may be shorter than ``world``.
    """
    n = len(grid.row_offsets)
    shares = []
    for rank in range(world):
        start, stop = rank * n // world, (rank + 1) * n // world
        if start == stop:
            continue
        top = grid.row_offsets[start]
        # the earliest tile row whose tiles reach into row `start`'s cells
        warmup = next(i for i in range(start + 1) if grid.row_offsets[i] + grid.tile_h > top)
        shares.append(RowShare(rank, start, stop, warmup))
    return shares


def part_path(dst: str | Path, rank: int) -> Path:
    """Part file of process ``rank`` for class map ``dst`` (hidden, beside it)."""
    dst = Path(dst)
    return dst.with_name(f".{dst.stem}.rank{rank}.part.npy")


class PartSink:
    """Writes the strips of one share to a ``.npy`` part file (uint8 [bands, rows, width]).

    Strips of warm-up rows are dropped. The file is complete when every row of the share has
    been written; :attr:`complete` says so.
    """

    def __init__(self, path: Path, grid: TileGrid, share: RowShare, bands: int) -> None:
        self.path = Path(path)
        self.first, self.end = share.rows(grid)
        self.bands = bands
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.uint8, shape=(bands, self.end - self.first, grid.width))
        self._next = self.first

    def write(self, row: int, strip: np.ndarray) -> None:
        """Store ``strip`` (uint8 [bands, rows, width]) starting at ``row``, unless it is a warm-up row."""
        if row < self.first:
            return
        if row != self._next or row + strip.shape[1] > self.end:
            raise RuntimeError(f"{self.path}: strip at row {row} out of order (expected {self._next}, share ends at {self.end})")
        self._data[:, row - self.first : row - self.first + strip.shape[1]] = strip
        self._next = row + strip.shape[1]

    @property
    def complete(self) -> bool:
        """True when every row of the share has been written."""
        return self._next == self.end

    def close(self) -> None:
        """Flush the part to disk."""
        if self._data is not None:
            self._data.flush()
            self._data = None


def write_from_parts(
    dst: Path,
    grid: TileGrid,
    shares: list[RowShare],
    profile: dict[str, Any],
    class_names: list[str],
    *,
    probabilities: Probabilities = "none",
    nodata_value: int = 255,
    cog: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the outputs of ``dst`` from the part files of ``shares`` (run by rank 0).

    The strips go to the files one tile row at a time, as a single process writes them, so the
    files are the same. Outputs are written under temporary names and renamed when complete.
    The part files are left for the caller to remove (:func:`remove_parts`).

    Raises:
        OutputExistsError: an output exists and ``overwrite`` is False.
        RuntimeError: a part file is missing or does not cover its rows.
    """
    paths = output_paths(dst, probabilities)
    check_outputs_free(paths, overwrite)
    edges = [*grid.row_offsets, grid.height]
    with contextlib.ExitStack() as stack:
        tmps = {key: stack.enter_context(atomic_output(path, cog)) for key, path in paths.items()}
        files = OutputFiles(tmps, profile, class_names, probabilities, nodata_value)
        try:
            for share in shares:
                data = np.load(part_path(dst, share.rank), mmap_mode="r")
                first, end = share.rows(grid)
                if data.shape != (files.bands, end - first, grid.width):
                    raise RuntimeError(f"{part_path(dst, share.rank)}: part has shape {data.shape}, "
                                       f"expected {(files.bands, end - first, grid.width)}")
                for i in range(share.start, share.stop):
                    files.write(edges[i], np.array(data[:, edges[i] - first : edges[i + 1] - first]))
                del data
            if not files.complete:
                raise RuntimeError(f"{dst}: the parts do not cover every row")
        finally:
            files.close()
    return dst


def remove_parts(dst: Path, world: int) -> None:
    """Delete the part files of ``dst`` left by up to ``world`` processes."""
    for rank in range(world):
        part_path(dst, rank).unlink(missing_ok=True)
