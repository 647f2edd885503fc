"""Streaming blend of overlapping tile predictions into finished, encoded row strips.

The raster is cut into *cells* by the tile origins: cell (a, b) spans rows
``[row_offsets[a], row_offsets[a + 1])`` and columns ``[col_offsets[b], col_offsets[b + 1])``
(the last ones run to the raster edge). Tiles arrive in row-major order; tile (a, b) covers
cell (a, b) entirely, and no later tile touches it, so the cell is final as soon as tile
(a, b) has been added. Parts of a tile that fall into later cells are kept (as float32
copies) until those cells are final. With overlap below half a tile, what is kept is the
overlap band under the current tile row (``overlap x width x classes`` floats) plus a
``tile x overlap`` column piece: the memory does not depend on the raster's height, and only
that thin band depends on its width.

Finished cells are encoded at once by each output's encoder (argmax and nodata for the class
map, uint8 probabilities ...: :meth:`geobp.inference.sinks.OutputSink.encode`), each into its
own bands of a full-width uint8 strip, which is handed out each time a tile row is complete.

The blender works on numpy arrays (CPU inference) or on torch tensors on the model's device
(GPU inference: blending stays on the GPU and only uint8 strips travel to the host).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from geobp.tiling import TileGrid

#: encode(probabilities float32 [K, h, w], valid bool [h, w]) -> uint8 [bands, h, w], numpy or torch
Encoder = Callable[[Any, Any], Any]


def _copy(a: Any) -> Any:
    return a.clone() if isinstance(a, torch.Tensor) else a.copy()


def _size(a: Any) -> int:
    return a.numel() if isinstance(a, torch.Tensor) else a.size


def _cells(offsets: list[int], length: int, span: int) -> list[list[tuple[int, int, int]]]:
    """Per tile along one axis: (cell index, first, end) of each cell it overlaps, in tile coordinates."""
    edges = [*offsets, length]
    out = []
    for i, off in enumerate(offsets):
        parts = []
        a = i
        while a < len(offsets) and edges[a] < off + span:
            parts.append((a, edges[a] - off, min(edges[a + 1], off + span) - off))
            a += 1
        out.append(parts)
    return out


class TileBlender:
    """Accumulates weighted tile probabilities and returns finished strips in row order.

    Args:
        grid: the tile grid (its weights must already be applied to the probabilities).
        encoders: ``(encode, bands)`` per output: ``encode`` turns the blended probabilities and
            validity of a finished cell into ``bands`` uint8 bands; the strips hold the bands of
            every output, in this order.
        first_row, stop_row: tile rows to expect (all of them by default). A blender that starts
            after row 0 lacks the contributions of earlier rows: the strips of its first rows are
            incomplete and only prime the overlap band of the later ones (distributed inference
            discards them).

    Attributes:
        buffered: float32 elements currently held for unfinished cells.
        peak_buffered: the most ever held (for memory checks).
    """

    def __init__(
        self, grid: TileGrid, encoders: Sequence[tuple[Encoder, int]], first_row: int = 0, stop_row: int | None = None
    ) -> None:
        self.grid = grid
        self.stop_row = len(grid.row_offsets) if stop_row is None else stop_row
        if not 0 <= first_row < self.stop_row <= len(grid.row_offsets):
            raise ValueError(f"tile rows [{first_row}, {stop_row}) are not inside the grid's {len(grid.row_offsets)} rows")
        self.encoders = list(encoders)
        #: first band of each output's bands in a strip, then the total
        self.band_offsets = [0]
        for _, bands in self.encoders:
            self.band_offsets.append(self.band_offsets[-1] + bands)
        self.out_bands = self.band_offsets[-1]
        self._row_cells = _cells(grid.row_offsets, grid.height, grid.tile_h)
        self._col_cells = _cells(grid.col_offsets, grid.width, grid.tile_w)
        self._row_edges = [*grid.row_offsets, grid.height]
        self._col_edges = [*grid.col_offsets, grid.width]
        self._pending: dict[tuple[int, int], list[np.ndarray]] = defaultdict(list)
        self._strip: Any = None
        self._next = (first_row, 0)
        self.buffered = 0
        self.peak_buffered = 0

    def add(self, i: int, j: int, probs: Any, valid: Any) -> tuple[int, Any] | None:
        """Add tile (i, j); return ``(first row, uint8 [bands, rows, width])`` when it completes a tile row.

        Args:
            probs: float32 [K, tile_h, tile_w] weighted probabilities (numpy or torch; modified in place).
            valid: bool [tile_h, tile_w], of the same kind.

        Returns:
            None, or the finished strip (numpy, or a torch tensor on the probabilities' device).
        """
        if isinstance(probs, torch.Tensor):
            # tensors made under inference mode (in another thread) may only be updated in it
            with torch.inference_mode():
                return self._add(i, j, probs, valid)
        return self._add(i, j, probs, valid)

    def _add(self, i: int, j: int, probs: Any, valid: Any) -> tuple[int, Any] | None:
        if (i, j) != self._next:
            raise RuntimeError(f"tiles out of order: expected {self._next}, got {(i, j)}")
        n_cols = len(self.grid.col_offsets)
        self._next = (i, j + 1) if j + 1 < n_cols else (i + 1, 0)
        own = None
        for a, r0, r1 in self._row_cells[i]:
            for b, c0, c1 in self._col_cells[j]:
                piece = probs[:, r0:r1, c0:c1]
                if (a, b) == (i, j):
                    own = piece
                else:  # anchored at the later cell's top-left corner, kept until it is final
                    self._pending[(a, b)].append(_copy(piece))
                    self.buffered += _size(piece)
        self.peak_buffered = max(self.peak_buffered, self.buffered)
        assert own is not None  # tile (i, j) always covers cell (i, j)
        for piece in self._pending.pop((i, j), []):
            own[:, : piece.shape[1], : piece.shape[2]] += piece
            self.buffered -= _size(piece)
        r1 = self._row_cells[i][0][2]
        c1 = self._col_cells[j][0][2]
        cell_valid = valid[:r1, :c1]
        if j == 0:
            shape = (self.out_bands, r1, self.grid.width)
            if isinstance(own, torch.Tensor):
                self._strip = torch.empty(shape, dtype=torch.uint8, device=own.device)
            else:
                self._strip = np.empty(shape, np.uint8)
        col = self._col_edges[j]
        for (encode, _), b0, b1 in zip(self.encoders, self.band_offsets, self.band_offsets[1:]):
            self._strip[b0:b1, :, col : col + c1] = encode(own, cell_valid)
        if j + 1 < n_cols:
            return None
        strip, self._strip = self._strip, None
        return self._row_edges[i], strip

    @property
    def done(self) -> bool:
        """True when every expected tile has been added."""
        return self._next[0] == self.stop_row
