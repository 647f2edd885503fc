"""Connected regions of a class map, polygonized strip by strip, with the regions that cross strips merged.

:class:`RegionStream` takes the rows of a class map in strips, top to bottom, and gives back the
regions that are finished (no pixel of theirs can follow in a later strip) as :class:`Regions`
batches. A region is a 4-connected set of pixels of one class (pixels that touch only at a corner
are two regions, as in ``rasterio.features.shapes(connectivity=4)`` and ``gdal_polygonize``). The
result is the same as polygonizing the whole map at once; memory holds one strip, the regions
still open at its bottom edge, and the finished regions not yet handed out.

How: each strip is labelled (:func:`label_strip`, one ``scipy.ndimage.label`` per class present)
and polygonized by ``rasterio.features.shapes`` on the labels, in pixel coordinates (column, row of
the whole map: integers, so pieces of a region from two strips share their edge exactly). Regions
touching the seam between two strips are joined by union-find on the labels either side of the
seam (same class, one pixel above the other); when such a region is finished its pieces are
dissolved with ``shapely.union_all``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from scipy import ndimage

#: 4-connectivity (edge neighbours): the structure of ``scipy.ndimage.label``.
_FOUR = ndimage.generate_binary_structure(2, 1)


@dataclass
class Regions:
    """Finished regions, one entry per region (columns of equal length).

    Attributes:
        class_id: int64, the region's class.
        pixels: int64, its pixel count.
        confidence_sum: float64, the sum of its pixels' confidence (NaN without a confidence raster).
        geometry: shapely polygons in pixel coordinates (x = column, y = row of the whole map).
    """

    class_id: np.ndarray
    pixels: np.ndarray
    confidence_sum: np.ndarray
    geometry: np.ndarray

    @classmethod
    def empty(cls) -> Regions:
        """No regions."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, object))

    @classmethod
    def concat(cls, parts: list[Regions]) -> Regions:
        """The regions of ``parts``, in order."""
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("class_id", "pixels", "confidence_sum", "geometry")))

    def __len__(self) -> int:
        return len(self.class_id)


def label_strip(classes: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label the 4-connected regions of equal class among the ``keep`` pixels.

    Args:
        classes: integer [h, w] class ids.
        keep: bool [h, w], the pixels to polygonize.

    Returns:
        (labels, label_class): int32 [h, w] labels 1..n (0 where not kept), and int64 [n + 1]
        the class of each label (entry 0 unused).
    """
    labels = np.zeros(classes.shape, np.int32)
    label_class = [np.zeros(1, np.int64)]
    count = 0
    values = classes[keep]
    present = np.flatnonzero(np.bincount(values.astype(np.int64).ravel())) if values.size else []
    for value in present:
        lab, n = ndimage.label(keep & (classes == value), structure=_FOUR)
        inside = lab > 0
        labels[inside] = lab[inside] + count
        label_class.append(np.full(n, value, np.int64))
        count += n
    return labels, np.concatenate(label_class)


def pixel_polygons(labels: np.ndarray, row0: int) -> np.ndarray:
    """Polygons of the labels of a strip whose first row is row ``row0`` of the map, indexed by label.

    Returns:
        object array [n + 1] of shapely polygons in map pixel coordinates (entry 0 is None).
    """
    n = int(labels.max()) if labels.size else 0
    out = np.full(n + 1, None, object)
    if n == 0:
        return out
    shapes = rasterio.features.shapes(labels, mask=labels > 0, connectivity=4, transform=Affine.translation(0, row0))
    # gather every ring's coordinates in one flat sequence and build the polygons in a few vectorized calls
    rings: list = []
    values: list[int] = []
    ring_counts: list[int] = []
    for geom, value in shapes:
        coordinates = geom["coordinates"]
        rings.extend(coordinates)
        ring_counts.append(len(coordinates))
        values.append(int(value))
    lengths = np.fromiter(map(len, rings), np.int64, len(rings))
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(rings)), np.float64, 2 * int(lengths.sum()))
    ring_geoms = shapely.linearrings(flat.reshape(-1, 2), indices=np.repeat(np.arange(len(rings)), lengths))
    out[values] = shapely.polygons(ring_geoms, indices=np.repeat(np.arange(len(values)), ring_counts))
    return out


@dataclass
class _Open:
    """A region that continues below the current strip: its totals and its pieces so far."""

    class_id: int
    pixels: int
    confidence_sum: float
    pieces: list = field(default_factory=list)


def _find(parent: dict, x: object) -> object:
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:  # path compression
        parent[x], x = root, parent[x]
    return root


class RegionStream:
    """Polygonize a class map strip by strip; see the module's docstring.

    Args:
        width: columns of the map.

    Use: :meth:`add` each strip in order (it returns the regions finished so far), then
    :meth:`finish` (the rest).
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.row = 0  # first row of the next strip
        self._open: dict[int, _Open] = {}
        self._next_key = 0
        # the previous strip's bottom row: the key of its open region per pixel (-1: none)
        self._bottom_keys = np.full(width, -1, np.int64)
        self._bottom_class = np.zeros(width, np.int64)

    def add(self, classes: np.ndarray, keep: np.ndarray, confidence: np.ndarray | None = None) -> Regions:
        """Take the next strip; return the regions that are finished.

        Args:
            classes: integer [h, width] class ids of rows ``self.row`` onwards.
            keep: bool [h, width], the pixels to polygonize (False: nodata, or a class not kept).
            confidence: float [h, width] per-pixel confidence, or None.
        """
        h = classes.shape[0]
        if classes.shape != (h, self.width) or keep.shape != classes.shape:
            raise ValueError(f"strip of shape {classes.shape} (keep {keep.shape}), expected (rows, {self.width})")
        row0, self.row = self.row, self.row + h
        if h == 0:
            return Regions.empty()
        labels, label_class = label_strip(classes, keep)
        n = len(label_class) - 1
        pixels = np.bincount(labels.ravel(), minlength=n + 1).astype(np.int64)
        if confidence is None:
            conf = np.full(n + 1, np.nan)
        else:
            conf = np.bincount(labels.ravel(), weights=confidence.ravel().astype(np.float64), minlength=n + 1)
        geoms = pixel_polygons(labels, row0)

        # seam: pairs (open key above, label below) of one class, one pixel above the other
        top = labels[0].astype(np.int64)
        linked = (top > 0) & (self._bottom_keys >= 0) & (label_class[top] == self._bottom_class)
        pairs = np.unique(np.stack([self._bottom_keys[linked], top[linked]], axis=1), axis=0) if linked.any() else np.zeros((0, 2), np.int64)
        bottom_labels = np.unique(labels[-1])
        bottom_labels = bottom_labels[bottom_labels > 0]

        # every label touched by the seam or the bottom edge goes through union-find; the others are finished now
        special = np.zeros(n + 1, bool)
        special[pairs[:, 1]] = True
        special[bottom_labels] = True
        done = np.flatnonzero(~special)[1:] if n else np.zeros(0, np.int64)
        finished = [Regions(label_class[done], pixels[done], conf[done], geoms[done])]

        parent: dict = {}
        for key, lab in pairs.tolist():
            a, b = ("o", key), ("n", lab)
            parent.setdefault(a, a)
            parent.setdefault(b, b)
            ra, rb = _find(parent, a), _find(parent, b)
            if ra != rb:
                parent[rb] = ra
        groups: dict[object, _Open] = {}
        for node in parent:
            root = _find(parent, node)
            group = groups.get(root)
            if group is None:
                group = groups[root] = _Open(int(label_class[node[1]]) if node[0] == "n" else self._open[node[1]].class_id, 0, 0.0)
            if node[0] == "o":
                old = self._open.pop(node[1])
                group.pixels += old.pixels
                group.confidence_sum += old.confidence_sum
                group.pieces.extend(old.pieces)
            else:
                lab = node[1]
                group.pixels += int(pixels[lab])
                group.confidence_sum += float(conf[lab])
                group.pieces.append(geoms[lab])
        # open regions of the strip above that nothing continues are finished
        closing = list(self._open.values())
        self._open = {}
        # bottom-edge labels not linked above start their own group
        for lab in bottom_labels.tolist():
            if ("n", lab) not in parent:
                groups[("n", lab)] = _Open(int(label_class[lab]), int(pixels[lab]), float(conf[lab]), [geoms[lab]])
                parent[("n", lab)] = ("n", lab)
        # groups with a label on the bottom row stay open (under a new key); the others are finished
        key_of_root: dict = {}
        key_of_label = np.full(n + 1, -1, np.int64)
        for lab in bottom_labels.tolist():
            root = _find(parent, ("n", lab))
            if root not in key_of_root:
                key_of_root[root], self._next_key = self._next_key, self._next_key + 1
                self._open[key_of_root[root]] = groups.pop(root)
            key_of_label[lab] = key_of_root[root]
        closing.extend(groups.values())
        bottom_keys = np.full(self.width, -1, np.int64)
        last = labels[-1].astype(np.int64)
        bottom_keys[last > 0] = key_of_label[last[last > 0]]
        self._bottom_keys = bottom_keys
        self._bottom_class = label_class[last]
        finished.append(_close(closing))
        return Regions.concat(finished)

    def finish(self) -> Regions:
        """The regions still open after the last strip."""
        closing = list(self._open.values())
        self._open = {}
        self._bottom_keys[:] = -1
        return _close(closing)


def _close(groups: list[_Open]) -> Regions:
    """Finished regions from open groups: their pieces dissolved into one polygon each."""
    if not groups:
        return Regions.empty()
    geoms = np.empty(len(groups), object)
    for i, g in enumerate(groups):
        geoms[i] = g.pieces[0] if len(g.pieces) == 1 else dissolve(g.pieces)
    return Regions(
        np.array([g.class_id for g in groups], np.int64), np.array([g.pixels for g in groups], np.int64),
        np.array([g.confidence_sum for g in groups], np.float64), geoms,
    )


def dissolve(pieces: list) -> shapely.Geometry:
    """One polygon from the pieces of one region, cut at strip edges.

    A piece's holes lie inside its strip, away from the strip's edges, so only the outer rings
    are unioned (far cheaper than unioning polygons with many holes); the pieces' holes are then
    put back into the union, with the holes the union itself encloses.
    """
    shells = shapely.polygons(shapely.get_exterior_ring(pieces))
    union = shapely.union_all(shells)
    holes = [ring for piece in pieces for ring in piece.interiors]
    if not holes:
        return union
    if union.geom_type == "Polygon":
        # valid by construction: each hole lies inside one piece's outer ring, apart from the other holes
        # (the tests check shapely.is_valid on maps full of diagonal contacts)
        return shapely.Polygon(union.exterior, [*union.interiors, *holes])
    result = shapely.difference(union, shapely.union_all(shapely.polygons(holes)))  # not expected: a 4-connected region
    return result if result.is_valid else shapely.make_valid(result)
