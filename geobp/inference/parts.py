"""One raster predicted by several processes: shares of tile rows, part files, and their assembly.

A raster is cut into contiguous runs of tile rows, one per process (:func:`share_rows`). A
process predicts its rows and writes each output's finished, encoded uint8 strips to a part file
(:class:`PartSink`: an :class:`~geobp.inference.sinks.OutputSink` that encodes as the output it
stands for and keeps its rows in a ``.npy`` file beside it); rank 0 then writes the outputs from
the parts (:func:`write_from_parts`), strip by strip in the order a single process writes them.
Any sink works in shares, with no code of its own for it.

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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geobp.inference.sinks import Array, OutputLayout, OutputSink
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


def part_path(output: str | Path, rank: int) -> Path:
    """Part file of process ``rank`` for the output file ``output`` (hidden, beside it)."""
    output = Path(output)
    return output.with_name(f".{output.stem}.rank{rank}.part.npy")


class PartSink:
    """One output's rows of one share, kept in a ``.npy`` part file (uint8 [bands, rows, width]).

    Encodes as ``sink`` does (whose file it stands for; ``sink`` itself is not opened). Strips
    of warm-up rows are dropped. :meth:`commit` keeps the part when every row of the share came;
    :meth:`abort` deletes it.

    Args:
        sink: the output.
        grid: the raster's tile grid.
        share: the tile rows of this process.
    """

    def __init__(self, sink: OutputSink, grid: TileGrid, share: RowShare) -> None:
        self.sink = sink
        self.path = part_path(sink.path, share.rank)
        self.first, self.end = share.rows(grid)
        self.width = grid.width
        self._data: Any = None
        self._next = self.first

    def bands(self, layout: OutputLayout) -> int:
        """The bands of ``sink``."""
        return self.sink.bands(layout)

    def encode(self, probs: Array, valid: Array) -> Array:
        """As ``sink`` encodes."""
        return self.sink.encode(probs, valid)

    def open(self, layout: OutputLayout) -> None:
        """Create the part file for the share's rows."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.uint8,
                                               shape=(self.bands(layout), self.end - self.first, self.width))

    def write(self, row: int, block: np.ndarray) -> None:
        """Store ``block`` (uint8 [bands, rows, width]) starting at ``row``, unless it is a warm-up row."""
        if row < self.first:
            return
        if row != self._next or row + block.shape[1] > self.end:
            raise RuntimeError(f"{self.path}: strip at row {row} out of order (expected {self._next}, share ends at {self.end})")
        self._data[:, row - self.first : row - self.first + block.shape[1]] = block
        self._next = row + block.shape[1]

    def commit(self) -> None:
        """Flush the part to disk.

        Raises:
            RuntimeError: rows of the share are missing (the part is deleted).
        """
        if self._data is None or self._next != self.end:
            self.abort()
            raise RuntimeError(f"{self.path}: the share ended before every row was written")
        self._data.flush()
        self._data = None

    def abort(self) -> None:
        """Delete the part file."""
        self._data = None
        self.path.unlink(missing_ok=True)


def write_from_parts(sinks: Sequence[OutputSink], grid: TileGrid, shares: list[RowShare], layout: OutputLayout) -> None:
    """Write the outputs ``sinks`` from the part files of ``shares`` (run by rank 0).

    The strips go to the sinks one tile row at a time, as a single process writes them, so the
    files are the same; every output is committed once all are written, and on an error none is
    left. The part files are left for the caller to remove (:func:`remove_parts`).

    Raises:
        FileNotFoundError: a part file is missing.
        RuntimeError: a part file does not cover its rows.
    """
    edges = [*grid.row_offsets, grid.height]
    try:
        for sink in sinks:
            sink.open(layout)
        for share in shares:
            first, end = share.rows(grid)
            for sink in sinks:
                path = part_path(sink.path, share.rank)
                data = np.load(path, mmap_mode="r")
                want = (sink.bands(layout), end - first, grid.width)
                if data.shape != want:
                    raise RuntimeError(f"{path}: part has shape {data.shape}, expected {want}")
                for i in range(share.start, share.stop):
                    sink.write(edges[i], np.array(data[:, edges[i] - first : edges[i + 1] - first]))
                del data
        for sink in sinks:
            sink.commit()
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise


def remove_parts(outputs: Iterable[Path], world: int) -> None:
    """Delete the part files of the output files ``outputs`` left by up to ``world`` processes."""
    for output in outputs:
        for rank in range(world):
            part_path(output, rank).unlink(missing_ok=True)
