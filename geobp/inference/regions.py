"""Connected regions of a class map, polygonized strip by strip, with the regions that cross strips merged.

:class:`RegionStream` takes the rows of a class map in strips, top to bottom, and gives back the
regions that are finished (no pixel of theirs can follow in a later strip) as :class:`Regions`
batches. A region is a 4-connected set of pixels of one class (pixels that touch only at a corner
are two regions, as in ``rasterio.features.shapes(connectivity=4)`` and ``gdal_polygonize``). The
result is the same as polygonizing the whole map at once; memory holds one strip, the regions
still open at its bottom edge, and the finished regions not yet handed out.

How: each strip is polygonized by ``rasterio.features.shapes`` on its classes (:func:`strip_polygons`;
on labels, :func:`label_strip`, only when confidence sums are asked for), in pixel coordinates
(column, row of the whole map: integers, so pieces of a region from two strips share their edge
exactly). The polygons' edges along the strip's first and last rows say which polygon holds each
pixel of those rows; regions touching the seam between two strips are joined by union-find
(same class, one pixel above the other). A region's pieces are kept as a list while it is open
and dissolved once, when it is finished (:func:`dissolve`), so no polygon is unioned twice.
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
    if not values.size:
        present = []
    elif values.min() >= 0 and values.max() < 1 << 16:
        present = np.flatnonzero(np.bincount(values.astype(np.int64).ravel()))
    else:  # negative or large class ids
        present = np.unique(values)
    for value in present:
        lab, n = ndimage.label(keep & (classes == value), structure=_FOUR)
        inside = lab > 0
        labels[inside] = lab[inside] + count
        label_class.append(np.full(n, value, np.int64))
        count += n
    return labels, np.concatenate(label_class)


#: the data types ``rasterio.features.shapes`` reads as they are
_SHAPES_DTYPES = frozenset(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "int32"))


def shapes_raster(classes: np.ndarray) -> np.ndarray | None:
    """``classes`` in a data type ``rasterio.features.shapes`` reads exactly, or None when its values do not fit int32."""
    if classes.dtype in _SHAPES_DTYPES:
        return classes
    info = np.iinfo(np.int32)
    if classes.size and (classes.min() < info.min or classes.max() > info.max):
        return None
    return classes.astype(np.int32)


@dataclass
class StripPolygons:
    """The polygons of one strip, indexed 1..n (index 0: none), and where they reach the strip's edges.

    Attributes:
        value: int64 [n + 1], the raster value each polygon was made from.
        geometry: object [n + 1], shapely polygons in map pixel coordinates (entry 0 is None).
        top: int64 [width], the polygon holding each pixel of the strip's first row (0: none).
        bottom: int64 [width], the same for its last row.
    """

    value: np.ndarray
    geometry: np.ndarray
    top: np.ndarray
    bottom: np.ndarray


def strip_polygons(raster: np.ndarray, mask: np.ndarray, row0: int) -> StripPolygons:
    """Polygonize one strip whose first row is row ``row0`` of the map: one polygon per 4-connected region of equal value.

    The pixels of the strip's first and last rows are read off the polygons' edges along those
    rows (a polygon's holes never reach them), so no label image is needed.
    """
    h, w = raster.shape
    shapes = rasterio.features.shapes(raster, mask=mask, connectivity=4, transform=Affine.translation(0, row0))
    # gather every ring's coordinates in one flat sequence and build the polygons in one vectorized call
    rings: list = []
    values: list = []
    ring_counts: list[int] = []
    for geom, value in shapes:
        coordinates = geom["coordinates"]
        rings.extend(coordinates)
        ring_counts.append(len(coordinates))
        values.append(value)
    n = len(values)
    out = StripPolygons(np.zeros(n + 1, np.int64), np.full(n + 1, None, object), np.zeros(w, np.int64), np.zeros(w, np.int64))
    if n == 0:
        return out
    lengths = np.fromiter(map(len, rings), np.int64, len(rings))
    xy = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(rings)), np.float64, 2 * int(lengths.sum())).reshape(-1, 2)
    ring_offsets = np.concatenate([[0], np.cumsum(lengths)])
    polygon_offsets = np.concatenate([[0], np.cumsum(ring_counts)])
    out.geometry[1:] = shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy, (ring_offsets, polygon_offsets))
    out.value[1:] = values
    # horizontal edges along the first row's top and the last row's bottom: pixel runs of their polygon
    ring_of = np.repeat(np.arange(len(rings)), lengths)
    polygon_of = np.repeat(np.arange(1, n + 1), ring_counts)[ring_of]
    x, y = xy[:, 0], xy[:, 1]
    along = (ring_of[:-1] == ring_of[1:]) & (y[:-1] == y[1:])
    for line, pixels in ((row0, out.top), (row0 + h, out.bottom)):
        edges = np.flatnonzero(along & (y[:-1] == line))
        start = np.minimum(x[edges], x[edges + 1]).astype(np.int64)
        runs = np.abs(x[edges + 1] - x[edges]).astype(np.int64)
        first = np.cumsum(runs) - runs
        pixels[np.repeat(start - first, runs) + np.arange(int(runs.sum()))] = np.repeat(polygon_of[edges], runs)
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
        raster = shapes_raster(classes) if confidence is None else None
        if raster is not None:  # polygons of the classes themselves: no labelling needed
            strip = strip_polygons(raster, keep, row0)
            label_class = strip.value
            conf = np.full(len(strip.value), np.nan)
        else:  # labels: for the confidence sums, or classes beyond int32
            labels, label_of_label = label_strip(classes, keep)
            strip = strip_polygons(labels, labels > 0, row0)
            label_class = label_of_label[strip.value]
            if confidence is None:
                conf = np.full(len(strip.value), np.nan)
            else:
                sums = np.bincount(labels.ravel(), weights=confidence.ravel().astype(np.float64), minlength=len(label_of_label))
                conf = sums[strip.value]
        # from here on, "label" is the index of a polygon of the strip (1..n)
        n = len(strip.value) - 1
        geoms = strip.geometry
        pixels = np.zeros(n + 1, np.int64)
        pixels[1:] = np.rint(shapely.area(geoms[1:]))  # in pixel coordinates, a polygon's area is its pixel count

        # seam: pairs (open key above, label below) of one class, one pixel above the other
        top = strip.top
        linked = (top > 0) & (self._bottom_keys >= 0) & (label_class[top] == self._bottom_class)
        pairs = np.unique(np.stack([self._bottom_keys[linked], top[linked]], axis=1), axis=0) if linked.any() else np.zeros((0, 2), np.int64)
        bottom_labels = np.unique(strip.bottom)
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
        last = strip.bottom
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
    cut = []
    for i, g in enumerate(groups):
        if len(g.pieces) == 1:
            geoms[i] = g.pieces[0]
        else:
            cut.append(i)
    if cut:
        geoms[cut] = dissolve([groups[i].pieces for i in cut])
    return Regions(
        np.array([g.class_id for g in groups], np.int64), np.array([g.pixels for g in groups], np.int64),
        np.array([g.confidence_sum for g in groups], np.float64), geoms,
    )


def dissolve(regions: list[list]) -> np.ndarray:
    """One polygon per region from its pieces, cut at strip edges (all regions at once, vectorized).

    A piece's holes lie inside its strip, away from the strip's edges, so only the outer rings
    are joined (:func:`stitch_shells`); the pieces' holes are then put back, with the holes the
    union itself encloses. Valid by construction: each hole lies inside one piece's outer ring,
    apart from the other holes (the tests check ``shapely.is_valid`` on maps full of diagonal
    contacts).

    Args:
        regions: per region, its pieces (shapely polygons in pixel coordinates).

    Returns:
        object array of one polygon per region.
    """
    sizes = [len(pieces) for pieces in regions]
    pieces = np.empty(sum(sizes), object)
    pieces[:] = list(itertools.chain.from_iterable(regions))
    region = np.repeat(np.arange(len(regions)), sizes)
    count = shapely.get_num_interior_rings(pieces)
    holes = shapely.get_interior_ring(np.repeat(pieces, count), np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count))
    stitched = stitch_shells(shapely.get_exterior_ring(pieces), region, len(regions))
    if stitched is None:  # not expected: see stitch_shells
        out = np.empty(len(regions), object)
        out[:] = [_overlay(np.asarray(p, object)) for p in regions]
        return out
    rings, ring_region, is_shell = stitched
    every = np.concatenate([rings, holes])
    owner = np.concatenate([ring_region, np.repeat(region, count)])
    first = np.concatenate([is_shell, np.zeros(len(holes), bool)])
    order = np.lexsort((~first, owner))  # by region, its shell first
    return shapely.polygons(every[order], indices=owner[order])


def _overlay(pieces: np.ndarray) -> shapely.Geometry:
    """One region's pieces dissolved by an overlay (the fallback of :func:`dissolve`)."""
    union = shapely.coverage_union_all(shapely.polygons(shapely.get_exterior_ring(pieces)))
    holes = [ring for piece in pieces for ring in piece.interiors]
    if not holes:
        return union
    if union.geom_type == "Polygon":
        return shapely.Polygon(union.exterior, [*union.interiors, *holes])
    result = shapely.difference(union, shapely.union_all(shapely.polygons(holes)))
    return result if result.is_valid else shapely.make_valid(result)


def stitch_shells(shells: np.ndarray, region: np.ndarray, regions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The outer rings of the pieces of regions, stitched along the seams into the rings of each region's union.

    Pieces of a region meet only along the rows where strips were cut, edge to edge, and never
    overlap. Their outer rings, all turned counter-clockwise, are cut at every pixel corner along
    their top and bottom rows; the unit segments two pieces of one region share (run in opposite
    directions) are dropped; what is left are chains of the rings' own edges, linked end to start
    into the union's rings (:func:`_link_chains`). This is linear in the vertices, where an
    overlay of the pieces (``shapely.union_all``, even ``coverage_union_all``) costs several times
    more on the large regions, and it runs on all the regions finished at once.

    Args:
        shells: the pieces' outer rings.
        region: int64, the region of each piece (0 .. ``regions`` - 1).
        regions: the number of regions.

    Returns:
        (rings, ring_region, is_shell): the union's rings, the region of each, and whether it is
        the region's shell (one per region) or a hole. None if the rings do not close as expected
        (the caller then falls back to an overlay; the tests check that this does not happen).
    """
    shells = np.where(shapely.is_ccw(shells), shells, shapely.reverse(shells))
    xy, ring = shapely.get_coordinates(shells, return_index=True)
    bounds = shapely.bounds(shells)
    x, y = xy[:, 0].astype(np.int64), xy[:, 1].astype(np.int64)
    edge_ring = ring[:-1]
    seam = (edge_ring == ring[1:]) & (y[:-1] == y[1:]) & ((y[:-1] == bounds[edge_ring, 1]) | (y[:-1] == bounds[edge_ring, 3]))
    # cut the seam edges at every pixel corner: point j of the result comes from vertex source[j]
    step = np.zeros(len(xy), np.int64)
    step[:-1][seam] = np.sign(x[1:] - x[:-1])[seam]
    emit = np.ones(len(xy), np.int64)
    emit[:-1][seam] = np.abs(x[1:] - x[:-1])[seam]
    source = np.repeat(np.arange(len(xy)), emit)
    offset = np.arange(len(source)) - np.repeat(np.cumsum(emit) - emit, emit)
    px, py, pring = x[source] + offset * step[source], y[source], ring[source]
    is_cut = np.repeat(np.append(seam, False), emit)  # points that start a unit seam segment
    # one integer per point and region (points of two regions never match)
    width, height = int(px.max()) + 2, int(py.max()) + 2
    if regions * height * width >= 1 << 62:
        return None
    key = (region[pring] * height + py) * width + px
    # edges: point j to j + 1 within a ring; unit seam segments that two pieces share cancel
    edge = np.flatnonzero(pring[:-1] == pring[1:])
    cut = edge[is_cut[edge]]
    _, inverse, counts = np.unique(np.minimum(key[cut], key[cut + 1]), return_inverse=True, return_counts=True)
    kept = np.ones(len(px), bool)  # by the edge's first point
    kept[cut[counts[inverse] == 2]] = False
    edge = edge[kept[edge]]
    return _link_chains(key, px, py, pring, edge, region, regions)


def _link_chains(key: np.ndarray, px: np.ndarray, py: np.ndarray, pring: np.ndarray, edge: np.ndarray,
                 region: np.ndarray, regions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Link directed edges (point j to j + 1, for j in ``edge``) into rings; returns as :func:`stitch_shells`.

    A chain is a run of consecutive edges of one input ring; it ends where the ring's next edge was
    dropped, at the ring's end, or at a point where two edges leave: the region touches itself
    at a corner there (its pixels fill two opposite quadrants, connected elsewhere, so one of the
    two other quadrants is enclosed). There the right turn is taken (the interior is on the left):
    each ring then follows one of the outside parts, so the enclosed one becomes a hole touching
    the shell at that point, as OGC validity wants, and no ring touches itself. None unless each
    region gets exactly one ring that turns counter-clockwise (its shell).
    """
    start_key, end_key = key[edge], key[edge + 1]
    order = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[order]
    first = np.searchsorted(sorted_keys, end_key, "left")
    leaving = np.searchsorted(sorted_keys, end_key, "right") - first  # edges leaving each edge's end point
    follows = np.zeros(len(edge), bool)  # edge i + 1 continues edge i
    follows[:-1] = (edge[1:] == edge[:-1] + 1) & (pring[edge[1:]] == pring[edge[:-1]]) & (leaving[:-1] == 1)
    starts = np.flatnonzero(np.concatenate([[True], ~follows[:-1]]))
    ends = np.concatenate([starts[1:] - 1, [len(edge) - 1]])
    chain_of_edge = np.repeat(np.arange(len(starts)), ends - starts + 1)
    dx = px[edge + 1] - px[edge]
    dy = py[edge + 1] - py[edge]
    # the chain after each chain: the edge leaving its end point, or the right turn of two
    e = ends
    a = order[np.minimum(first[e], len(edge) - 1)]
    b = order[np.minimum(first[e] + 1, len(edge) - 1)]
    right = dx[e] * dy[a] - dy[e] * dx[a] < 0
    if not np.isin(leaving[e], (1, 2)).all():
        return None
    next_chain = chain_of_edge[np.where((leaving[e] == 1) | right, a, b)].tolist()
    seen = [False] * len(starts)
    ring_chains = []
    for c0 in range(len(starts)):
        if seen[c0]:
            continue
        chains = []
        c = c0
        while not seen[c]:
            seen[c] = True
            chains.append(c)
            c = next_chain[c]
        if c != c0:
            return None
        ring_chains.append(chains)
    # each ring's points: the first point of each of its edges, chain after chain
    chain_order = np.fromiter(itertools.chain.from_iterable(ring_chains), np.int64, len(starts))
    sizes = (ends - starts + 1)[chain_order]
    points = edge[np.repeat(starts[chain_order] - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))]
    ring_id = np.repeat(np.repeat(np.arange(len(ring_chains)), [len(c) for c in ring_chains]), sizes)
    ring_region = region[pring[edge[starts[[c[0] for c in ring_chains]]]]]
    x, y = px[points], py[points]
    # keep the corners only: drop the points inside straight runs (pixel corners cut along the seams)
    prev, after = _cyclic_neighbours(ring_id)
    corner = ~(((x[prev] == x) & (x == x[after])) | ((y[prev] == y) & (y == y[after])))
    x, y, ring_id = x[corner], y[corner], ring_id[corner]
    _, after = _cyclic_neighbours(ring_id)
    area2 = np.bincount(ring_id, weights=(x * y[after] - x[after] * y).astype(np.float64), minlength=len(ring_chains))
    is_shell = area2 > 0
    if not (np.bincount(ring_region[is_shell], minlength=regions) == 1).all():
        return None
    rings = shapely.linearrings(np.stack([x, y], axis=1).astype(np.float64), indices=ring_id)
    return rings, ring_region, is_shell


def _cyclic_neighbours(ring_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For points of closed rings listed ring after ring (``ring_id`` sorted, first point not repeated): each point's previous and next point."""
    n = len(ring_id)
    position = np.arange(n)
    first = np.flatnonzero(np.r_[True, ring_id[1:] != ring_id[:-1]])
    last = np.r_[first[1:] - 1, n - 1]
    prev, after = position - 1, position + 1
    prev[first] = last
    after[last] = first
    return prev, after
