"""Polygons of a class map for a GIS: :func:`vectorize_class_map`, streamed over a raster of any size.

The class map (one integer band, as ``geobp infer`` writes it, or a user's) is read in strips of
whole rows (:attr:`VectorOptions.strip_pixels` pixels each, so memory does not grow with the
width or the height) and polygonized by :class:`~geobp.inference.regions.RegionStream`: one
polygon per 4-connected region of one class (pixels touching only at a corner are two regions),
equal to ``rasterio.features.shapes(connectivity=4)`` over the whole map dissolved per region.

Per polygon: ``class_id``, ``class_name`` (from the map's ``CLASS_NAMES`` tag, else ``class_<id>``),
``area`` (in the CRS's units squared), ``pixels`` and ``confidence``: the mean over the region's
pixels of a confidence raster (``geobp infer``'s ``_confidence.tif``: the top-class probability;
or its ``_probs.tif``, whose per-pixel maximum is the same), null without one.

Options (:class:`VectorOptions`):

- nodata pixels (the map's nodata value, or its mask) are never polygonized; ``classes`` keeps
  a subset of the classes (after sieving, so a small region of a dropped class is still merged
  into its neighbour first).
- ``min_area`` (pixels): regions smaller than this are merged into their largest neighbour,
  before polygonizing: ``rasterio.features.sieve`` (``gdal_sieve``: the largest neighbour by pixel
  count, which is not always the one sharing the longest edge) with 4-connectivity, run on each
  strip with :attr:`VectorOptions.halo` rows of context above and below it (``max(2 * min_area,
  32)``; strips are then at least that many rows, so memory grows with ``min_area`` times the
  width). The set of small regions is exactly that of sieving the whole map (a region that
  reaches past the context spans more rows than ``min_area``); the neighbour each joins is the
  whole-map sieve's too unless its largest neighbour reaches past the context and holds fewer
  pixels inside it than another neighbour (a limit of streaming; the tests compare with the
  whole-map sieve). Regions that touch only nodata keep their class, as in ``gdal_sieve``.
- ``simplify`` (pixels): topology-preserving simplification of the polygons as one coverage
  (``shapely.coverage_simplify``): neighbours keep sharing their edges, without gaps or overlaps.
  It runs on batches of finished polygons (:attr:`VectorOptions.batch_polygons`); edges between
  polygons of two batches, and the edges along nodata and the map's border, keep their pixel
  steps (both sides stay identical).

The file is written in batches and renamed into place when complete
(:mod:`geobp.inference.vectorfile`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import shapely
from rasterio.windows import Window

from geobp.choices import VectorFormat, check_choice
from geobp.errors import BandMismatchError, ConfigError, OutputExistsError, RasterMismatchError, format_error
from geobp.inference.blockcache import block_cache_bytes
from geobp.inference.regions import RegionStream, Regions
from geobp.inference.vectorfile import EXTENSIONS, VectorFileWriter
from geobp.raster import open_raster

#: The attributes of every polygon, in order.
FIELDS = ["class_id", "class_name", "area", "pixels", "confidence"]


@dataclass(frozen=True)
class VectorOptions:
    """How a class map becomes polygons (checked once, here).

    Attributes:
        format: the file format (``gpkg``, ``fgb``, ``geojson``, ``parquet``).
        simplify: tolerance of the topology-preserving simplification, in pixels (0: none).
        min_area: regions of fewer pixels are merged into their largest neighbour first (0 or 1: none).
        classes: the class ids to keep (None: all).
        overwrite: replace an existing file.
        strip_pixels: pixels per strip read at once (rows = this / width, at least one). The work
            of joining regions across strips grows with the seams (width / rows per pixel), so
            strips are tall enough to keep it small next to polygonizing (a few hundred MiB).
        batch_polygons: finished polygons held before they are (simplified and) written.
    """

    format: VectorFormat = "gpkg"
    simplify: float = 0.0
    min_area: int = 0
    classes: tuple[int, ...] | None = None
    overwrite: bool = False
    strip_pixels: int = 16 * 1024 * 1024
    batch_polygons: int = 20_000

    def __post_init__(self) -> None:
        check_choice("vector format", self.format, VectorFormat)
        if not self.simplify >= 0:
            raise ConfigError(format_error(None, f"--simplify must be >= 0 pixels (found {self.simplify})", "pass 0 or a positive tolerance"))
        if self.min_area < 0:
            raise ConfigError(format_error(None, f"--min_area must be >= 0 pixels (found {self.min_area})", "pass 0 or a positive pixel count"))
        if self.strip_pixels < 1 or self.batch_polygons < 1:
            raise ConfigError(format_error(None, "strip_pixels and batch_polygons must be >= 1", "pass positive numbers"))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(sorted({int(c) for c in self.classes})))

    @property
    def halo(self) -> int:
        """Rows of context read above and below each strip for the sieve: ``max(2 * min_area, 32)`` (0 without ``min_area``)."""
        return max(2 * self.min_area, 32) if self.min_area > 1 else 0

    def strip_rows(self, width: int) -> int:
        """Rows per strip: :attr:`strip_pixels` / ``width``, at least one, and at least :attr:`halo` when sieving."""
        return max(1, self.strip_pixels // max(width, 1), self.halo)


@dataclass(frozen=True)
class VectorSummary:
    """What :func:`vectorize_class_map` wrote: the file and its polygon count."""

    path: Path
    polygons: int


def vector_path(class_map: str | Path, fmt: VectorFormat, out_dir: str | Path | None = None) -> Path:
    """Where the polygons of ``class_map`` go: ``<out_dir>/<its stem>.<ext>`` (its folder by default).

    ``out/a_classes.tif`` gives ``out/a_classes.gpkg``.
    """
    class_map = Path(class_map)
    return Path(out_dir or class_map.parent) / f"{class_map.stem}{EXTENSIONS[fmt]}"


def class_names_of(src: rasterio.DatasetReader) -> dict[int, str]:
    """The class names a geobp class map carries (its ``CLASS_NAMES`` tag), by class id; empty without."""
    names = src.tags().get("CLASS_NAMES")
    return dict(enumerate(names.split(","))) if names else {}


def check_class_map(src: rasterio.DatasetReader) -> None:
    """Refuse rasters that are not class maps.

    Raises:
        BandMismatchError: more than one band, or not an integer data type.
    """
    if src.count != 1:
        raise BandMismatchError(format_error(
            src.name, f"a class map has one band (found {src.count})", "pass a class map such as geobp infer's <name>_classes.tif"))
    if not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
        raise BandMismatchError(format_error(
            src.name, f"a class map holds integer class ids (found {src.dtypes[0]})", "pass a class map such as geobp infer's <name>_classes.tif"))


def _check_confidence(src: rasterio.DatasetReader, conf: rasterio.DatasetReader) -> None:
    if (conf.height, conf.width) != (src.height, src.width) or not conf.transform.almost_equals(src.transform):
        raise RasterMismatchError(format_error(
            conf.name, f"the confidence raster is not on the class map's grid ({conf.height}x{conf.width} {conf.transform[:6]} against "
            f"{src.height}x{src.width} {src.transform[:6]})", "pass the _confidence.tif or _probs.tif written with the class map"))


def read_strips(src: rasterio.DatasetReader, options: VectorOptions,
                conf: rasterio.DatasetReader | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """The class map in strips of whole rows, top to bottom: (classes, keep, confidence).

    ``classes`` are sieved when ``options.min_area`` asks (with ``options.halo`` rows of context);
    ``keep`` is False at nodata pixels and at classes not kept; ``confidence`` (float32 0..1, or
    None) is the confidence raster's single band, or the maximum over its bands (probabilities).
    """
    height, width = src.height, src.width
    rows = options.strip_rows(width)
    halo = options.halo
    nodata = src.nodata
    scale = 1 / 255 if conf is not None and conf.dtypes[0] == "uint8" else 1.0
    for row in range(0, height, rows):
        end = min(height, row + rows)
        top, bottom = max(0, row - halo), min(height, end + halo)
        window = Window(0, top, width, bottom - top)
        data = src.read(1, window=window)
        if nodata is not None:
            valid = data != nodata
        elif rasterio.enums.MaskFlags.per_dataset in src.mask_flag_enums[0]:
            valid = src.read_masks(1, window=window) > 0
        else:
            valid = np.ones(data.shape, bool)
        if halo:
            data = rasterio.features.sieve(data.astype(np.int32, copy=False) if data.dtype.itemsize > 2 else data,
                                           options.min_area, mask=valid, connectivity=4)
        data, valid = data[row - top:end - top], valid[row - top:end - top]
        keep = valid & np.isin(data, options.classes) if options.classes is not None else valid
        confidence = None
        if conf is not None:
            values = conf.read(window=Window(0, row, width, end - row))
            confidence = (values.max(axis=0) if len(values) > 1 else values[0]).astype(np.float32) * np.float32(scale)
        yield data, keep, confidence


def _to_crs(geometry: np.ndarray, transform: Any) -> np.ndarray:
    """Pixel coordinates (column, row) to the map's CRS with its affine transform."""
    a, b, c, d, e, f = transform[:6]
    matrix = np.array([[a, d], [b, e]])
    offset = np.array([c, f])
    return shapely.transform(geometry, lambda xy: xy @ matrix + offset)


class _Batches:
    """Finished regions held until a batch is full, then simplified, given attributes and written."""

    def __init__(self, writer: VectorFileWriter, src: rasterio.DatasetReader, options: VectorOptions) -> None:
        self.writer = writer
        self.options = options
        self.transform = src.transform
        self.names = class_names_of(src)
        self.pending: list[Regions] = []
        self.count = 0

    def add(self, regions: Regions) -> None:
        if len(regions):
            self.pending.append(regions)
            self.count += len(regions)
        if self.count >= self.options.batch_polygons:
            self.flush()

    def flush(self) -> None:
        regions = Regions.concat(self.pending)
        self.pending, self.count = [], 0
        if not len(regions):
            return
        self.writer.write(*attributes(regions, self.transform, self.names, self.options.simplify))


def attributes(regions: Regions, transform: Any, names: dict[int, str], simplify: float = 0.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The polygons in the CRS (simplified as one coverage when asked) and their attribute columns."""
    geometry = regions.geometry
    if simplify > 0:
        # vertices at every pixel corner, so that neighbours' shared edges match vertex for vertex
        geometry = shapely.coverage_simplify(shapely.segmentize(geometry, 1.0), simplify, simplify_boundary=False)
        geometry = shapely.simplify(geometry, 0)  # drops the collinear vertices left on the unsimplified edges
        bad = ~shapely.is_valid(geometry)
        if bad.any():
            geometry[bad] = shapely.make_valid(geometry[bad])
    geometry = _to_crs(geometry, transform)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = regions.confidence_sum / regions.pixels
    columns = {
        "class_id": regions.class_id.astype(np.int32),
        "class_name": np.array([names.get(int(c), f"class_{int(c)}") for c in regions.class_id], object),
        "area": shapely.area(geometry),
        "pixels": regions.pixels,
        "confidence": confidence,
    }
    return geometry, columns


def _empty_columns() -> dict[str, np.ndarray]:
    return {"class_id": np.zeros(0, np.int32), "class_name": np.zeros(0, object), "area": np.zeros(0),
            "pixels": np.zeros(0, np.int64), "confidence": np.zeros(0)}


def vectorize_class_map(class_map: str | Path, dst: str | Path | None = None, options: VectorOptions | None = None,
                        confidence: str | Path | None = None) -> VectorSummary:
    """Write the polygons of a class map (see the module's docstring), streamed and atomically.

    Args:
        class_map: a one-band integer GeoTIFF (``geobp infer``'s ``<name>_classes.tif``).
        dst: the vector file; by default :func:`vector_path` beside the class map.
        options: format, simplification, sieve, classes (:class:`VectorOptions`; its defaults when None).
        confidence: a raster on the class map's grid whose single band (or maximum over bands)
            is the per-pixel confidence (uint8 values are divided by 255); None: null confidences.

    Returns:
        The file written and its polygon count.

    Raises:
        DataNotFoundError, RasterReadError: a raster is missing or unreadable.
        BandMismatchError: the class map has several bands or is not integer.
        RasterMismatchError: the confidence raster is on another grid.
        OutputExistsError: ``dst`` exists and ``options.overwrite`` is False.
    """
    options = options or VectorOptions()
    dst = Path(dst) if dst is not None else vector_path(class_map, options.format)
    if dst.exists() and not options.overwrite:
        raise OutputExistsError(format_error(dst, "output exists", "pass --overwrite to replace it, or choose another output folder"))
    with open_raster(class_map) as src:
        check_class_map(src)
        conf_ctx = open_raster(confidence) if confidence is not None else None
        conf = conf_ctx.__enter__() if conf_ctx is not None else None
        try:
            if conf is not None:
                _check_confidence(src, conf)
            crs = src.crs.to_wkt() if src.crs else None
            writer = VectorFileWriter(dst, options.format, crs, FIELDS)
            try:
                batches = _Batches(writer, src, options)
                stream = RegionStream(src.width)
                # every block is read once: GDAL's default cache (5% of RAM) would keep them all, growing with the map
                rows = options.strip_rows(src.width)
                cache = sum(block_cache_bytes(r.profile, rows) for r in (src, conf) if r is not None)
                with rasterio.Env(GDAL_CACHEMAX=cache):
                    for classes, keep, values in read_strips(src, options, conf):
                        batches.add(stream.add(classes, keep, values))
                batches.add(stream.finish())
                batches.flush()
                path = writer.commit(_empty_columns())
            except BaseException:
                writer.abort()
                raise
        finally:
            if conf_ctx is not None:
                conf_ctx.__exit__(None, None, None)
    return VectorSummary(path, writer.features)


def parse_classes(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``--classes`` as class ids: ``"1,3"`` or ``[1, 3]``; None stays None.

    Raises:
        ConfigError: not a comma-separated list of non-negative integers.
    """
    if text is None or not isinstance(text, str):
        return None if text is None else tuple(int(c) for c in text)
    try:
        values = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        values = ()
    if not values or min(values) < 0:
        raise ConfigError(format_error(None, f"--classes expects class ids such as 1,3 (found {text!r})", "pass comma-separated class ids"))
    return values


__all__ = ["FIELDS", "VectorOptions", "VectorSummary", "attributes", "check_class_map", "class_names_of", "parse_classes",
           "read_strips", "vector_path", "vectorize_class_map"]
