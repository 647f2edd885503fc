"""``Grid``: a north-up pixel grid (CRS, transform, size) and the window and footprint arithmetic on it.

Pure geometry, no pixels: which grid a file is on, whether two grids share a pixel lattice
(a plain windowed read instead of a warp), a window's bounds, a footprint in another CRS and
how much of one footprint others cover. The tolerances are those of :mod:`geobp.raster`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import rasterio
from rasterio.crs import CRS
from rasterio.windows import Window

from geobp.raster import ORIGIN_PIXEL_TOL, TRANSFORM_RTOL, RasterInfo, project_bounds

Bounds = tuple[float, float, float, float]


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid.

    Args:
        crs: the CRS as a string rasterio reads (``EPSG:32633``, WKT).
        transform: the six affine coefficients ``(a, b, c, d, e, f)`` (``b == d == 0``).
        width, height: the size in pixels.
    """

    crs: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int

    @classmethod
    def from_info(cls, info: RasterInfo) -> Grid:
        """The grid of a raster header (:func:`geobp.raster.read_info`)."""
        return cls(str(info.crs), tuple(info.transform), info.width, info.height)  # type: ignore[arg-type]

    @property
    def affine(self) -> rasterio.Affine:
        """The transform as a :class:`rasterio.Affine`."""
        return rasterio.Affine(*self.transform)

    @property
    def res(self) -> tuple[float, float]:
        """(x, y) pixel size in CRS units, both positive."""
        return (abs(self.transform[0]), abs(self.transform[4]))

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return (self.height, self.width)

    @property
    def bounds(self) -> Bounds:
        """(left, bottom, right, top) of the whole grid."""
        return self.window_bounds(Window(0, 0, self.width, self.height))

    def window_bounds(self, window: Window) -> Bounds:
        """(left, bottom, right, top) of ``window`` (which may reach outside the grid)."""
        a, _, c, _, e, f = self.transform
        left, top = c + a * window.col_off, f + e * window.row_off
        return (left, top + e * window.height, left + a * window.width, top)

    def lattice_offset(self, other: Grid) -> tuple[int, int] | None:
        """(row, col) of this grid's origin on ``other``'s pixels when both share CRS, pixel size and
        lattice (origins an integer number of pixels apart within :data:`~geobp.raster.ORIGIN_PIXEL_TOL`);
        None otherwise (``other`` must be warped onto this grid)."""
        if self.crs != other.crs and CRS.from_user_input(self.crs) != CRS.from_user_input(other.crs):
            return None
        a, _, c, _, e, f = self.transform
        oa, _, oc, _, oe, of = other.transform
        if not (math.isclose(a, oa, rel_tol=TRANSFORM_RTOL) and math.isclose(e, oe, rel_tol=TRANSFORM_RTOL)):
            return None
        col, row = (c - oc) / oa, (f - of) / oe
        if abs(col - round(col)) > ORIGIN_PIXEL_TOL or abs(row - round(row)) > ORIGIN_PIXEL_TOL:
            return None
        return int(round(row)), int(round(col))

    def footprint_in(self, crs: str) -> Bounds | None:
        """This grid's bounds as a box in ``crs`` (edges densified); None where PROJ cannot project them."""
        return bounds_in(self.crs, crs, self.bounds)


@functools.lru_cache(maxsize=4096)
def bounds_in(src_crs: str, dst_crs: str, bounds: Bounds) -> Bounds | None:
    """``bounds`` (in ``src_crs``) as a box in ``dst_crs``; None when they cannot be projected there. Memoized."""
    if src_crs == dst_crs:
        return bounds
    try:
        out = project_bounds(src_crs, dst_crs, *bounds)
    except Exception:  # noqa: BLE001 - PROJ raises several types for points outside a projection's domain
        return None
    return out if all(math.isfinite(v) for v in out) else None


def overlap(a: Bounds, b: Bounds) -> Bounds | None:
    """The intersection of two boxes in one CRS; None when it is empty."""
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[2] > box[0] and box[3] > box[1] else None


def overlaps(reference: Grid, other: Grid) -> bool:
    """True when ``other``'s footprint overlaps ``reference`` by more than half a reference pixel each way.

    Compared in ``other``'s CRS: a scene's small footprint projects there well, where a
    continental map's footprint may not project into the scene's CRS.
    """
    box = reference.footprint_in(other.crs)
    if box is None:
        return False
    half_x = (box[2] - box[0]) / reference.width / 2
    half_y = (box[3] - box[1]) / reference.height / 2
    inter = overlap(box, other.bounds)
    return inter is not None and inter[2] - inter[0] > half_x and inter[3] - inter[1] > half_y


def coverage(reference: Grid, others: Sequence[Grid], samples: int = 64) -> float:
    """Fraction of ``reference``'s footprint inside the union of ``others``' footprints.

    Measured on a ``samples`` x ``samples`` lattice of points over the reference (the union of boxes
    in several CRSs has no closed form worth writing): each point is projected into each other
    grid's CRS and tested against its bounds. Exact to about ``1 / samples`` of the side.
    """
    import numpy as np
    from pyproj import Transformer

    a, _, c, _, e, f = reference.transform
    steps = (np.arange(samples) + 0.5) / samples
    xs, ys = np.meshgrid(c + a * reference.width * steps, f + e * reference.height * steps)
    xs, ys = xs.ravel(), ys.ravel()
    inside = np.zeros(xs.size, bool)
    for other in others:
        if other.crs == reference.crs:
            px, py = xs, ys
        else:
            px, py = Transformer.from_crs(reference.crs, other.crs, always_xy=True).transform(xs, ys)
        l, b, r, t = other.bounds
        inside |= (px >= l) & (px <= r) & (py >= b) & (py <= t)
    return float(inside.mean())
