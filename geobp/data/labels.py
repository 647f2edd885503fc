"""Label sources and alignment: every label form becomes one uint8 label raster on the image's grid.

Forms accepted (``data.labels``):

- label rasters on any grid and CRS: a folder, a glob or a list, paired with the images by
  footprint (every raster overlapping an image contributes; the first in sorted order wins where
  several overlap), or one raster covering many images (a land-cover map);
- a vector file (``.gpkg``, ``.geojson``, ``.shp``, ``.fgb`` ... anything OGR reads) in any CRS,
  rasterized with the class of ``label_field`` (an integer id or a class name).

Raw values go through ``label_map`` (raw value -> class id or the ignore index); a value that is
neither mapped nor a class id is an error naming the file and the values. The result for an
image is a uint8 raster on that image's grid (the image is never resampled), ``ignore_index``
where no label covers it, written once into ``<cache root>/.geobp_cache/labels/`` under a key
of the inputs' paths, sizes, modification times and the options (a changed label file gives a
new key, so it is rebuilt). From there the tile loader, the band statistics and ``geobp check``
read it like a mask of the ``images/`` + ``masks/`` layout.

Alignment reads only the part of each label source that overlaps the image (a window of a
continental map, a bounding-box query of a vector file); it holds one image-sized uint8 array
per source at a time.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds

from geobp.data.preprocessing import CACHE_DIR
from geobp.data.scenes import RASTER_SUFFIXES, Scene
from geobp.data.validation import Problem, SceneReport, check_consistency, check_headers, scan_pixels
from geobp.errors import ConfigError, DataNotFoundError, GeobpError, GeoreferenceError, LabelError, format_error
from geobp.raster import ORIGIN_PIXEL_TOL, TRANSFORM_RTOL, RasterInfo, atomic_path, derive_profile, open_raster, read_info

#: Suffixes read as label rasters; any other single file is read as a vector file with OGR.
LABEL_RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")
#: Bumped when the aligned rasters' content or the report changes meaning.
LABEL_CACHE_VERSION = 1
#: A label finer than this fraction of the image's pixel size is resampled with the mode.
MODE_RATIO = 0.5

RawKey = int | str


@dataclass(frozen=True)
class LabelOptions:
    """How raw labels become class ids (the ``data.label_*`` options).

    Args:
        num_classes: class ids are ``0..num_classes-1``.
        ignore_index: the label of pixels that count nowhere (and of pixels no label covers).
        class_names: class names; a vector's string labels are looked up here.
        label_map: raw value (number or string) -> class id or ``ignore_index``; applied first.
        label_field: the vector attribute holding the class; None burns every feature as class 1.
        label_background: class of vector pixels outside every feature; ``ignore_index`` when None.
        all_touched: rasterize every pixel a feature touches, not only those whose centre it covers.

    Raises:
        ConfigError: a mapped value or the background is neither a class id nor the ignore index.
    """

    num_classes: int
    ignore_index: int = 255
    class_names: tuple[str, ...] | None = None
    label_map: Mapping[RawKey, int] = field(default_factory=dict)
    label_field: str | None = None
    label_background: int | None = None
    all_touched: bool = False

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.label_map.items() if not self.is_label(v)}
        if bad:
            raise ConfigError(
                format_error(
                    None,
                    f"data.label_map maps {bad} to values that are neither class ids 0..{self.num_classes - 1} "
                    f"nor the ignore index {self.ignore_index}",
                    "map every raw value to a class id or the ignore index",
                )
            )
        if self.label_background is not None and not self.is_label(self.label_background):
            raise ConfigError(
                format_error(
                    None,
                    f"data.label_background {self.label_background} is neither a class id 0..{self.num_classes - 1} "
                    f"nor the ignore index {self.ignore_index}",
                    "set it to a class id, or leave it unset to ignore pixels outside every feature",
                )
            )

    def is_label(self, value: int) -> bool:
        """True for a class id or the ignore index."""
        return 0 <= value < self.num_classes or value == self.ignore_index

    @property
    def background(self) -> int:
        """The value of vector pixels outside every feature."""
        return self.ignore_index if self.label_background is None else self.label_background

    def lookup(self, raw: Any) -> int | None:
        """Class id (or ignore index) of one raw value; None when it is neither mapped nor a class id."""
        if isinstance(raw, str):
            if raw in self.label_map:
                return int(self.label_map[raw])
            if self.class_names is not None and raw in self.class_names:
                return self.class_names.index(raw)
            try:
                raw = float(raw)
            except ValueError:
                return None
        value = float(raw)
        if math.isnan(value) or not value.is_integer():
            return None
        key = int(value)
        if key in self.label_map:
            return int(self.label_map[key])
        if str(key) in self.label_map:  # keys written as strings in a JSON/YAML map
            return int(self.label_map[str(key)])
        return key if self.is_label(key) else None

    def key(self) -> str:
        """A stable text form of the options, for the cache key."""
        d = asdict(self)
        d["label_map"] = sorted((str(k), int(v)) for k, v in self.label_map.items())
        return json.dumps(d, sort_keys=True, default=str)


@dataclass
class LabelReport:
    """What alignment found for one image (kept beside the aligned raster, shown by ``geobp check``).

    Attributes:
        sources: the label files that contributed at least one pixel.
        source_crs: their CRS, same order.
        source_res: their pixel size (x, y) in their own CRS units, same order (None for vectors).
        image_crs: the image's CRS.
        image_res: the image's pixel size (x, y).
        coverage: fraction of the image's pixels that got a class (not the ignore index).
        histogram: pixel count per class id after mapping (length ``num_classes``).
        unmapped: raw values that are neither mapped nor class ids (as text, sorted).
        method: how the labels were brought onto the grid (``copy``, ``nearest``, ``mode``, ``rasterize``).
    """

    sources: list[str] = field(default_factory=list)
    source_crs: list[str] = field(default_factory=list)
    source_res: list[tuple[float, float] | None] = field(default_factory=list)
    image_crs: str = ""
    image_res: tuple[float, float] = (0.0, 0.0)
    coverage: float = 0.0
    histogram: list[int] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    method: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VectorInfo:
    """Header of a vector label file."""

    path: str
    crs: str
    bounds: tuple[float, float, float, float]
    fields: tuple[str, ...]


@dataclass
class LabelSources:
    """The label inputs of a dataset: label rasters (headers) or one vector file."""

    rasters: list[RasterInfo] = field(default_factory=list)
    vector: VectorInfo | None = None

    @property
    def paths(self) -> list[str]:
        """Every label file."""
        return [self.vector.path] if self.vector is not None else [r.path for r in self.rasters]


# ----- finding the sources ------------------------------------------------------------------


def expand_paths(spec: str | Path | Sequence[str | Path], suffixes: tuple[str, ...], what: str) -> list[Path]:
    """A folder (its files with ``suffixes``, not recursive), a glob, a file, or a list of them.

    Raises:
        DataNotFoundError: a path does not exist, or nothing matches.
    """
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Path] = []
    for item in items:
        text = str(item)
        if any(c in text for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise DataNotFoundError(format_error(text, f"no {what} matches this pattern", f"check the data.{what} pattern"))
            out += found
        elif Path(text).is_dir():
            found = sorted(
                p for p in Path(text).iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
            )
            if not found:
                raise DataNotFoundError(format_error(text, f"folder holds no {'/'.join(suffixes)} files", f"check data.{what}"))
            out += found
        elif Path(text).is_file():
            out.append(Path(text))
        else:
            raise DataNotFoundError(format_error(text, "file or folder not found", f"check data.{what}"))
    return out


def read_vector_info(path: str | Path) -> VectorInfo:
    """CRS, bounds and attribute names of a vector file (header only).

    Raises:
        DataNotFoundError: OGR cannot open the file.
        GeoreferenceError: the layer has no CRS.
    """
    import pyogrio

    try:
        info = pyogrio.read_info(str(path), force_total_bounds=True)
    except Exception as err:  # noqa: BLE001 - pyogrio raises several DataSource errors
        raise DataNotFoundError(
            format_error(path, f"not a readable vector file ({err})", "pass a GeoPackage, GeoJSON, Shapefile or FlatGeobuf")
        ) from err
    if not info.get("crs"):
        raise GeoreferenceError(format_error(path, "vector layer has no CRS", "assign one, e.g. `ogr2ogr -a_srs EPSG:XXXX OUT IN`"))
    bounds = tuple(float(b) for b in info["total_bounds"])
    return VectorInfo(str(path), str(info["crs"]), bounds, tuple(str(f) for f in info["fields"]))  # type: ignore[arg-type]


def find_label_sources(spec: str | Path | Sequence[str | Path], label_field: str | None = None) -> LabelSources:
    """Read the headers of ``data.labels``: label rasters, or a single vector file.

    Raises:
        DataNotFoundError: a path is missing or unreadable.
        ConfigError: a vector file mixed with others, or ``label_field`` is not one of its attributes.
        GeoreferenceError: a label has no CRS.
    """
    paths = expand_paths(spec, LABEL_RASTER_SUFFIXES, "labels")
    vectors = [p for p in paths if p.suffix.lower() not in LABEL_RASTER_SUFFIXES]
    if vectors:
        if len(paths) > 1:
            raise ConfigError(
                format_error(vectors[0], "a vector label file must be the only label source", "merge the layers into one file")
            )
        info = read_vector_info(vectors[0])
        if label_field is not None and label_field not in info.fields:
            raise ConfigError(
                format_error(info.path, f"attribute {label_field!r} not found (attributes: {', '.join(info.fields)})", "set data.label_field")
            )
        return LabelSources(vector=info)
    rasters = [read_info(p) for p in paths]
    for r in rasters:
        if r.crs is None:
            raise GeoreferenceError(format_error(r.path, "label raster has no CRS", "assign one, e.g. `gdal_edit.py -a_srs EPSG:XXXX FILE`"))
    return LabelSources(rasters=rasters)


# ----- geometry -----------------------------------------------------------------------------


def raster_bounds(info: RasterInfo) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a north-up raster."""
    a, _, c, _, e, f = info.transform
    return (c, f + e * info.height, c + a * info.width, f)


def _overlaps(image: RasterInfo, crs: str, bounds: tuple[float, float, float, float]) -> bool:
    """True when ``bounds`` (in ``crs``) overlap the image by more than half a pixel each way."""
    try:
        l, b, r, t = transform_bounds(CRS.from_user_input(crs), CRS.from_user_input(image.crs), *bounds, densify_pts=21)
    except Exception:  # noqa: BLE001 - a footprint that cannot be projected there does not overlap
        return False
    il, ib, ir, it = raster_bounds(image)
    a, e = image.transform[0], -image.transform[4]
    return min(r, ir) - max(l, il) > a / 2 and min(t, it) - max(b, ib) > e / 2


def covering_sources(image: RasterInfo, sources: LabelSources) -> LabelSources:
    """The label sources whose footprint overlaps the image (a vector file always, if it overlaps)."""
    if sources.vector is not None:
        v = sources.vector
        return LabelSources(vector=v) if _overlaps(image, v.crs, v.bounds) else LabelSources()
    return LabelSources(rasters=[r for r in sources.rasters if _overlaps(image, r.crs, raster_bounds(r))])  # type: ignore[arg-type]


def _same_lattice(image: RasterInfo, label: RasterInfo) -> tuple[int, int] | None:
    """(row, col) offset of the image in the label when both share CRS, pixel size and pixel lattice."""
    if CRS.from_user_input(image.crs) != CRS.from_user_input(label.crs):
        return None
    ia, _, ic, _, ie, if_ = image.transform
    la, _, lc, _, le, lf = label.transform
    if not (math.isclose(ia, la, rel_tol=TRANSFORM_RTOL) and math.isclose(ie, le, rel_tol=TRANSFORM_RTOL)):
        return None
    col, row = (ic - lc) / la, (if_ - lf) / le
    if abs(col - round(col)) > ORIGIN_PIXEL_TOL or abs(row - round(row)) > ORIGIN_PIXEL_TOL:
        return None
    return int(round(row)), int(round(col))


# ----- value mapping ------------------------------------------------------------------------


def map_values(raw: np.ndarray, nodata: float | None, options: LabelOptions) -> tuple[np.ndarray, list[str]]:
    """Raw label values to uint8 class ids through ``options`` (nodata becomes the ignore index).

    Returns:
        (uint8 array of the same shape, the raw values found that are neither mapped nor class ids;
        those pixels become the ignore index).
    """
    raw = np.asarray(raw)
    if raw.dtype.kind in "iub" and raw.dtype.itemsize <= 2:
        # a lookup table over the dtype's range: one pass, no sort
        lo = int(raw.min()) if raw.size else 0
        shifted = (raw.astype(np.int32) - lo).ravel()
        present = np.flatnonzero(np.bincount(shifted)) + lo if raw.size else np.zeros(0, np.int64)
        lut = np.full(int(present.max() - lo + 1) if present.size else 1, options.ignore_index, np.uint8)
        unmapped = []
        for v in present.tolist():
            out = options.ignore_index if nodata is not None and v == nodata else options.lookup(v)
            if out is None:
                unmapped.append(str(v))
            else:
                lut[v - lo] = out
        return lut[shifted].reshape(raw.shape), unmapped
    values, inverse = np.unique(raw, return_inverse=True)
    table = np.full(len(values), options.ignore_index, np.uint8)
    unmapped = []
    for i, v in enumerate(values.tolist()):
        if (nodata is not None and v == nodata) or (isinstance(v, float) and math.isnan(v)):
            continue
        out = options.lookup(v)
        if out is None:
            unmapped.append(f"{v:g}" if isinstance(v, float) else str(v))
        else:
            table[i] = out
    return table[inverse.reshape(raw.shape)], unmapped


def unmapped_error(path: str, values: Sequence[str], options: LabelOptions) -> LabelError:
    """The one-line error for raw label values that are neither mapped nor class ids."""
    shown = ", ".join(values[:10]) + (f" ... ({len(values)} values)" if len(values) > 10 else "")
    example = values[0] if values else "V"
    return LabelError(
        format_error(
            path,
            f"label values [{shown}] are neither in data.label_map nor class ids 0..{options.num_classes - 1} "
            f"(or the ignore index {options.ignore_index})",
            f"map them in data.label_map (e.g. {{{example}: {options.ignore_index}}} to ignore them), or raise data.num_classes",
        )
    )


# ----- alignment ----------------------------------------------------------------------------


def _align_raster(image: RasterInfo, label: RasterInfo, options: LabelOptions) -> tuple[np.ndarray, list[str], str]:
    """One label raster on the image grid (ignore index where it does not reach); its unmapped values and method."""
    ignore = options.ignore_index
    out = np.full(image.shape, ignore, np.uint8)
    with open_raster(label.path) as src:
        offset = _same_lattice(image, label)
        if offset is not None:  # the same pixel lattice (within tolerance): a window copy, no warp
            row, col = offset
            r0, c0 = max(row, 0), max(col, 0)
            r1, c1 = min(row + image.height, label.height), min(col + image.width, label.width)
            if r1 <= r0 or c1 <= c0:
                return out, [], "copy"
            raw = src.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
            mapped, unmapped = map_values(raw, label.nodata, options)
            out[r0 - row : r1 - row, c0 - col : c1 - col] = mapped
            return out, unmapped, "copy"
        # only the part of the label that covers the image (plus a margin for the resampling kernel)
        l, b, r, t = transform_bounds(CRS.from_user_input(image.crs), src.crs, *raster_bounds(image), densify_pts=21)
        win = from_bounds(l, b, r, t, src.transform)
        c0, r0 = max(math.floor(win.col_off) - 2, 0), max(math.floor(win.row_off) - 2, 0)
        c1 = min(math.ceil(win.col_off + win.width) + 2, src.width)
        r1 = min(math.ceil(win.row_off + win.height) + 2, src.height)
        if r1 <= r0 or c1 <= c0:
            return out, [], "nearest"
        window = Window(c0, r0, c1 - c0, r1 - r0)
        mapped, unmapped = map_values(src.read(1, window=window), label.nodata, options)
        # the label's pixel size measured in the image's CRS: a much finer label takes the mode
        wl, _, wr, _ = transform_bounds(src.crs, CRS.from_user_input(image.crs), *src.window_bounds(window))
        lw = (wr - wl) / window.width
        method = "mode" if lw < MODE_RATIO * image.transform[0] else "nearest"
        reproject(
            mapped,
            out,
            src_transform=src.window_transform(window),
            src_crs=src.crs,
            src_nodata=ignore,
            dst_transform=rasterio.Affine(*image.transform),
            dst_crs=CRS.from_user_input(image.crs),
            dst_nodata=ignore,
            resampling=Resampling.mode if method == "mode" else Resampling.nearest,
        )
    return out, unmapped, method


def _read_features(image: RasterInfo, vector: VectorInfo, options: LabelOptions) -> tuple[list[Any], list[int], list[str]]:
    """Features over the image, reprojected to its CRS: (geometries, class values, unmapped raw values)."""
    import pyogrio

    bbox = transform_bounds(CRS.from_user_input(image.crs), CRS.from_user_input(vector.crs), *raster_bounds(image), densify_pts=21)
    columns = [options.label_field] if options.label_field else []
    frame = pyogrio.read_dataframe(vector.path, bbox=bbox, columns=columns)
    frame = frame[frame.geometry.notna() & ~frame.geometry.is_empty]
    if frame.empty:
        return [], [], []
    frame = frame.to_crs(image.crs)
    unmapped: set[str] = set()
    values = [1] * len(frame)
    if options.label_field is not None:
        for i, raw in enumerate(frame[options.label_field].tolist()):
            v = None if raw is None or (isinstance(raw, float) and math.isnan(raw)) else options.lookup(raw)
            if v is None:
                unmapped.add(str(raw))
            values[i] = options.ignore_index if v is None else v
    return list(frame.geometry), values, sorted(unmapped)


#: Image rows aligned at a time (bounds the memory of one image's alignment, whatever its size).
ALIGN_STRIP_ROWS = 1024


class Alignment:
    """The labels of one image on its grid, produced strip by strip, and what they hold (the report).

    Label rasters are reprojected with nearest neighbour (the mode when a label pixel is under
    half an image pixel); one on the image's own pixel lattice is copied, without a warp. Several
    rasters form a mosaic: where they overlap, the first (in sorted order) wins. A vector file's
    features are reprojected to the image's CRS and rasterized (later features on top). Pixels no
    label covers get the ignore index.

    Args:
        image: the image's header.
        sources: all label sources of the dataset; those not overlapping the image are skipped.
        options: value mapping and rasterization options.
    """

    def __init__(self, image: RasterInfo, sources: LabelSources, options: LabelOptions) -> None:
        self.image, self.options = image, options
        self.covering = covering_sources(image, sources)
        self._hist = np.zeros(256, np.int64)
        self._unmapped: set[str] = set()
        self._used: dict[str, str] = {}  # label path -> method, in the order they first contributed
        self._features: tuple[list[Any], list[int]] | None = None
        if sources.vector is not None:
            geoms: list[Any] = []
            if self.covering.vector is not None:
                geoms, values, bad = _read_features(image, self.covering.vector, options)
                self._unmapped.update(bad)
                self._features = (geoms, values)
            if not geoms:
                warnings.warn(
                    format_error(
                        sources.vector.path,
                        f"no feature over image {image.path}: all its pixels are ignored",
                        "check that the vector file and the image cover the same area (CRS, extent)",
                    ),
                    stacklevel=3,
                )
                self._features = None

    def strips(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, uint8 labels [rows, W]) from top to bottom; the report gathers as they go."""
        image, options, ignore = self.image, self.options, self.options.ignore_index
        step = rows or ALIGN_STRIP_ROWS
        a, b, c, d, e, f = image.transform
        for row in range(0, image.height, step):
            part = replace(image, height=min(step, image.height - row), transform=(a, b, c, d, e, f + e * row))
            out = np.full(part.shape, ignore, np.uint8)
            if self._features is not None:
                out[:] = options.background
                geoms, values = self._features
                rasterize(zip(geoms, values), out=out, transform=rasterio.Affine(*part.transform),
                          all_touched=options.all_touched, dtype=np.uint8)
                self._used.setdefault(self.covering.paths[0], "rasterize")
            for label in covering_sources(part, self.covering).rasters:
                aligned, bad, method = _align_raster(part, label, options)
                self._unmapped.update(bad)
                fill = (out == ignore) & (aligned != ignore)
                if fill.any() or bad:
                    out[fill] = aligned[fill]
                    self._used.setdefault(label.path, method)
            self._hist += np.bincount(out.ravel(), minlength=256)
            yield row, out

    def report(self) -> LabelReport:
        """What the strips held (call after iterating :meth:`strips` to the end)."""
        image, options = self.image, self.options
        by_path = {r.path: r for r in self.covering.rasters}
        vector = self.covering.vector
        hist = self._hist[: options.num_classes].astype(int).tolist()
        return LabelReport(
            sources=list(self._used),
            source_crs=[str(by_path[p].crs) if p in by_path else str(vector.crs if vector else "") for p in self._used],
            source_res=[(by_path[p].transform[0], -by_path[p].transform[4]) if p in by_path else None for p in self._used],
            image_crs=str(image.crs),
            image_res=(image.transform[0], -image.transform[4]),
            coverage=float(sum(hist)) / max(image.width * image.height, 1),
            histogram=hist,
            unmapped=sorted(self._unmapped, key=_numeric_first),
            method=list(self._used.values()),
        )


def align_labels(image: RasterInfo, sources: LabelSources, options: LabelOptions) -> tuple[np.ndarray, LabelReport]:
    """Every label source covering ``image`` on its grid, in memory (see :class:`Alignment`).

    Returns:
        (uint8 label array [H, W], the :class:`LabelReport`). Unmapped values are reported, not
        raised (see :func:`aligned_labels`).
    """
    alignment = Alignment(image, sources, options)
    labels = np.concatenate([strip for _, strip in alignment.strips()])
    return labels, alignment.report()


def _numeric_first(text: str) -> tuple[int, float, str]:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


# ----- the cache ----------------------------------------------------------------------------


def _stamp(path: str | Path) -> str:
    st = os.stat(path)
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def cache_key(image: RasterInfo, covering: LabelSources, options: LabelOptions) -> str:
    """Key of an aligned label raster: the image's and labels' paths, sizes and mtimes, and the options."""
    raw = "\n".join([str(LABEL_CACHE_VERSION), _stamp(image.path), *map(_stamp, covering.paths), options.key()])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


class _Unmapped(Exception):
    """Internal: stops writing an aligned raster that holds unmapped values."""


def _write_aligned(path: Path, alignment: Alignment) -> LabelReport:
    """Write the aligned labels strip by strip, atomically: tiled like the image (or 256 px), deflate-compressed.

    Nothing is written when the labels hold unmapped values (raises :class:`_Unmapped`).
    """
    image = alignment.image
    with open_raster(image.path) as src:
        profile = src.profile
    # the image's blocks when GeoTIFF tiles can have them, so tiles placed in image blocks decode one mask block
    bh, bw = image.block_height, image.block_width
    blocks = (bh, bw) if bh % 16 == 0 and bw % 16 == 0 else (256, 256)
    profile = derive_profile(profile, count=1, dtype="uint8", nodata=None, blockysize=blocks[0], blockxsize=blocks[1])
    rows = max(ALIGN_STRIP_ROWS // blocks[0], 1) * blocks[0]  # whole blocks per strip
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            for row, strip in alignment.strips(rows):
                dst.write(strip, 1, window=Window(0, row, image.width, strip.shape[0]))
        report = alignment.report()
        if report.unmapped:
            raise _Unmapped()
    return report


def aligned_labels(
    image: RasterInfo,
    sources: LabelSources,
    options: LabelOptions,
    cache_root: str | Path,
    strict: bool = True,
) -> tuple[RasterInfo | None, LabelReport]:
    """The image's label raster from the cache, aligning it first when missing or out of date.

    Args:
        image: the image's header.
        sources: all label sources of the dataset.
        options: value mapping and rasterization options.
        cache_root: the folder that holds ``.geobp_cache/`` (the dataset root or the images' folder).
        strict: raise on unmapped values (``fit``); ``geobp check`` passes False to report them.

    Returns:
        (header of the aligned uint8 label raster, or None when unmapped values kept it from
        being written (only without ``strict``); the :class:`LabelReport`).

    Raises:
        LabelError: ``strict`` and some raw values are neither mapped nor class ids.
        RasterReadError: a label file cannot be read.
    """
    covering = covering_sources(image, sources)
    key = cache_key(image, covering, options)
    folder = Path(cache_root) / CACHE_DIR / "labels"
    tif, meta = folder / f"{Path(image.path).stem}.{key}.tif", folder / f"{Path(image.path).stem}.{key}.json"
    report: LabelReport | None = None
    if tif.exists() and meta.exists():
        try:
            data = json.loads(meta.read_text())
            data["source_res"] = [tuple(r) if r else None for r in data["source_res"]]
            data["image_res"] = tuple(data["image_res"])
            report = LabelReport(**data)
        except (OSError, ValueError, TypeError):
            report = None  # a broken entry is rebuilt below
    if report is None:
        alignment = Alignment(image, sources, options)
        try:
            report = _write_aligned(tif, alignment)
        except _Unmapped:  # only valid label rasters are cached
            report = alignment.report()
            if strict:
                raise unmapped_error(", ".join(report.sources) or image.path, report.unmapped, options) from None
            return None, report
        with atomic_path(meta, suffix=".json") as tmp:
            tmp.write_text(json.dumps(asdict(report)))
    return read_info(tif), report


# ----- scenes -------------------------------------------------------------------------------


def find_labelled_scenes(
    images: str | Path | Sequence[str | Path],
    labels: str | Path | Sequence[str | Path],
    options: LabelOptions,
    cache_root: str | Path | None = None,
    progress: bool = False,
) -> tuple[list[Scene], list[LabelReport]]:
    """Images with their labels aligned onto their grids (from the cache when up to date).

    Scenes that no label reaches (no labelled pixel) are left out with a warning.

    Args:
        images: a folder, a glob, a GeoTIFF, or a list of them (one scene per file).
        labels: the label sources (see the module docstring).
        options: value mapping and rasterization options.
        cache_root: the folder that gets ``.geobp_cache/``; the first image's folder when None.
        progress: show a progress bar while aligning.

    Returns:
        (scenes whose ``mask`` is the aligned label raster, their label reports), same order.

    Raises:
        DataNotFoundError: no image, or no scene with a labelled pixel.
        ConfigError: two images share a file name.
        LabelError: raw label values neither mapped nor class ids.
        RasterReadError, GeoreferenceError, BandMismatchError: as for ``images/`` + ``masks/``.
    """
    from rich.progress import track

    paths = expand_paths(images, RASTER_SUFFIXES, "images")
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise ConfigError(format_error(p, f"same file name as {seen[p.stem]} (scene names must be unique)", "rename one of them"))
        seen[p.stem] = p
    headers = [check_headers(p.stem, p, None, require_mask=False) for p in paths]
    check_consistency(headers)
    for h in headers:
        for problem in h.problems:
            if problem.severity == "fatal" and problem.error is not None:
                raise problem.error
    sources = find_label_sources(labels, options.label_field)
    root = Path(cache_root) if cache_root is not None else paths[0].parent
    scenes, reports = [], []
    for h in track(headers, description="Aligning labels", disable=not progress or len(headers) < 2, transient=True):
        assert h.image is not None
        mask, report = aligned_labels(h.image, sources, options, root)
        if report.coverage == 0:
            warnings.warn(
                format_error(h.image.path, "no label covers this image: the scene is left out", "check data.labels (paths, CRS, extent)"),
                stacklevel=2,
            )
            continue
        scenes.append(Scene(h.name, h.image, mask))
        reports.append(report)
    if not scenes:
        raise DataNotFoundError(
            format_error(", ".join(sources.paths[:3]), "no label covers any image", "check that data.labels and data.images cover the same area")
        )
    return scenes, reports


def check_labelled_dataset(
    images: str | Path | Sequence[str | Path],
    labels: str | Path | Sequence[str | Path],
    options: LabelOptions,
    cache_root: str | Path | None = None,
    nodata: float | None = None,
    full: bool = True,
    progress: bool = False,
) -> list[SceneReport]:
    """``geobp check`` for ``data.images`` + ``data.labels``: every problem of every scene, and its label report.

    Each scene's labels are aligned (through the cache) without stopping at unmapped values:
    they become a fatal problem of the scene, and ``label_report`` lists them with the label
    sources, their CRS and resolution, the coverage and the class histogram.

    Args:
        images, labels, options, cache_root: as in :func:`find_labelled_scenes`.
        nodata: image nodata value; the files' tags when None.
        full: also read every block of every image.
        progress: show a progress bar.

    Raises:
        DataNotFoundError: no image, or the label sources cannot be found.
    """
    from rich.progress import track

    paths = expand_paths(images, RASTER_SUFFIXES, "images")
    reports = [check_headers(p.stem, p, None, require_mask=False) for p in paths]
    check_consistency(reports)
    sources = find_label_sources(labels, options.label_field)
    root = Path(cache_root) if cache_root is not None else paths[0].parent
    for r in track(reports, description="Aligning labels", disable=not progress, transient=True):
        if r.fatal or r.image is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the coverage check below says it once, in the report
                r.mask, r.label_report = aligned_labels(r.image, sources, options, root, strict=False)
        except GeobpError as err:
            r.problems.append(Problem("fatal", str(err), err))
            continue
        rep = r.label_report
        if rep.unmapped:
            err = unmapped_error(", ".join(rep.sources) or r.image.path, rep.unmapped, options)
            r.problems.append(Problem("fatal", str(err), err))
        elif rep.coverage == 0:
            r.problems.append(
                Problem("warning", format_error(r.image.path, "no label covers this image (left out of training)", "check data.labels"))
            )
        if full:
            scan_pixels(r, options.num_classes, options.ignore_index, nodata)
    return reports
