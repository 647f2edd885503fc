"""Label sources: every form of training labels, and how raw label values become class ids.

Forms accepted (``data.labels``):

- label rasters on any grid and CRS: a folder, a glob or a list, paired with the images by
  footprint (every raster overlapping an image contributes), or one raster covering many images
  (a land-cover map);
- a vector file (``.gpkg``, ``.geojson``, ``.shp``, ``.fgb`` ... anything OGR reads) in any CRS,
  with the class in ``label_field`` (an integer id or a class name).

A file's kind is decided by opening it, not by its name: what GDAL opens as a raster (any raster
driver: GeoTIFF named ``.gtif``, Erdas Imagine ``.img``, JPEG 2000, VRT, netCDF ...) is a label
raster, else what OGR opens as a vector layer is a vector file (:func:`read_label_source`). A
folder lists the files with :data:`LABEL_FOLDER_SUFFIXES`.

Raw values go through ``label_map`` (raw value -> class id or the ignore index); a value that is
neither mapped nor a class id is an error naming the file and the values. Bringing the sources
onto each image's grid (and the cache) is :mod:`geobp.data.alignment`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geobp.classes import check_num_classes, class_names_for, invalid_labels
from geobp.errors import ConfigError, DataNotFoundError, GeoreferenceError, LabelError, RasterReadError, format_error
from geobp.raster import RasterInfo, read_info
from geobp.sources.grid import Grid, bounds_in
from geobp.sources.locations import expand_paths  # noqa: F401 - re-exported

#: Files listed when ``data.labels`` names a folder (label rasters of common raster formats). A
#: file named directly or by a glob is taken whatever its suffix.
LABEL_FOLDER_SUFFIXES = (".tif", ".tiff", ".gtif", ".vrt", ".img", ".jp2", ".nc")

RawKey = int | str


@dataclass(frozen=True)
class LabelOptions:
    """How raw labels become class ids (the ``data.label_*`` options, with the classes).

    Built once where the configuration enters, by :meth:`from_config` from a ``data:`` section;
    the field defaults are the options' one default (the data module's signature refers to them).

    Args:
        num_classes: class ids are ``0..num_classes-1``; at least 2.
        ignore_index: the label of pixels that count nowhere (and of pixels no label covers), in
            ``[num_classes, 255]`` (aligned labels are uint8).
        class_names: class names; a vector's string labels are looked up here.
        label_map: raw value (number or string) -> class id or ``ignore_index``; applied first.
        label_field: the vector attribute holding the class; None burns every feature as class 1.
        label_background: class of vector pixels outside every feature; ``ignore_index`` when None.
        all_touched: rasterize every pixel a feature touches, not only those whose centre it covers.

    Raises:
        ConfigError: fewer than two classes, an ignore index outside ``[num_classes, 255]``, or a
            mapped value or the background that is neither a class id nor the ignore index.
    """

    num_classes: int
    ignore_index: int = 255
    class_names: tuple[str, ...] | None = None
    label_map: Mapping[RawKey, int] | None = None
    label_field: str | None = None
    label_background: int | None = None
    all_touched: bool = False

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> LabelOptions:
        """The label options of a ``data:`` section (a mapping of ``data.<name>`` options).

        Reads ``num_classes`` (required), ``ignore_index``, ``class_names`` (``class_<i>`` when
        missing or empty), ``label_map``, ``label_field``, ``label_background`` and
        ``all_touched``; a missing or null key takes the field's default. Other keys are ignored.

        Raises:
            ConfigError: ``num_classes`` is not set, ``class_names`` has not one name per class,
                or a value fails the checks of the class.
        """
        num_classes = data.get("num_classes")
        if num_classes is None:
            raise ConfigError(format_error(None, "num_classes is not set", "set data.num_classes"))
        num_classes = int(num_classes)
        check_num_classes(num_classes)

        def get(name: str) -> Any:
            value = data.get(name)
            return getattr(cls, name) if value is None else value

        return cls(
            num_classes=num_classes,
            ignore_index=int(get("ignore_index")),
            class_names=tuple(class_names_for(data.get("class_names"), num_classes)),
            label_map=data.get("label_map"),
            label_field=get("label_field"),
            label_background=get("label_background"),
            all_touched=bool(get("all_touched")),
        )

    def __post_init__(self) -> None:
        # the option values as configs give them (a list of names, None for no map) in one form
        object.__setattr__(self, "label_map", dict(self.label_map or {}))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))
        object.__setattr__(self, "all_touched", bool(self.all_touched))
        check_num_classes(self.num_classes)
        if not 0 <= self.ignore_index < 256 or self.ignore_index < self.num_classes:
            raise ConfigError(
                format_error(
                    None,
                    f"ignore_index must be in [num_classes, 255] (found {self.ignore_index} with {self.num_classes} classes)",
                    "use 255 unless your masks use another value for unlabelled pixels",
                )
            )
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

    @property
    def settings(self) -> dict[str, Any]:
        """How raw labels were turned into classes, JSON-able (stored in checkpoints as ``label_options``).

        Returns:
            ``{"label_map": {raw: class} (raw values as given; JSON turns them into text, which
            :meth:`lookup` reads the same), "label_field": str | None,
            "label_background": int | None, "all_touched": bool}``.
        """
        return {
            "label_map": {k: int(v) for k, v in self.label_map.items()},  # type: ignore[union-attr]
            "label_field": self.label_field,
            "label_background": self.label_background,
            "all_touched": self.all_touched,
        }

    def is_label(self, value: int) -> bool:
        """True for a class id or the ignore index (the rule of :func:`geobp.classes.invalid_labels`)."""
        return not bool(invalid_labels(np.asarray(value), self.num_classes, self.ignore_index))

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


def read_label_source(path: str | Path) -> RasterInfo | VectorInfo:
    """The header of one label file, its kind found by opening it (never by its name).

    GDAL's raster drivers are tried first (:func:`geobp.raster.read_info`), then OGR's vector
    drivers (:func:`read_vector_info`).

    Returns:
        A :class:`RasterInfo` for a raster, a :class:`VectorInfo` for a vector file.

    Raises:
        DataNotFoundError: the file does not exist, or neither GDAL nor OGR can open it.
        GeoreferenceError: a vector layer has no CRS.
    """
    try:
        return read_info(path)
    except RasterReadError as raster_err:
        try:
            return read_vector_info(path)
        except DataNotFoundError:
            raise DataNotFoundError(
                format_error(
                    path,
                    "neither a raster GDAL can open nor a vector file OGR can open (expected a label raster or vector layer)",
                    "pass a label raster (GeoTIFF, .img, .jp2, .vrt, netCDF ...) or a vector file "
                    "(GeoPackage, GeoJSON, Shapefile, FlatGeobuf), or re-export the file if it is damaged",
                )
            ) from raster_err


def find_label_sources(spec: str | Path | Sequence[str | Path], label_field: str | None = None) -> LabelSources:
    """Read the headers of ``data.labels``: label rasters, or a single vector file.

    Each file is opened to tell a raster from a vector (:func:`read_label_source`).

    Raises:
        DataNotFoundError: a path is missing or neither a raster nor a vector file.
        ConfigError: a vector file mixed with others, or ``label_field`` is not one of its attributes.
        GeoreferenceError: a label has no CRS.
    """
    paths = expand_paths(spec, LABEL_FOLDER_SUFFIXES, "labels")
    headers = [read_label_source(p) for p in paths]
    vectors = [h for h in headers if isinstance(h, VectorInfo)]
    if vectors:
        if len(paths) > 1:
            raise ConfigError(
                format_error(vectors[0].path, "a vector label file must be the only label source", "merge the layers into one file")
            )
        info = vectors[0]
        if label_field is not None and label_field not in info.fields:
            raise ConfigError(
                format_error(info.path, f"attribute {label_field!r} not found (attributes: {', '.join(info.fields)})", "set data.label_field")
            )
        return LabelSources(vector=info)
    rasters = [h for h in headers if isinstance(h, RasterInfo)]
    for r in rasters:
        if r.crs is None:
            raise GeoreferenceError(format_error(r.path, "label raster has no CRS", "assign one, e.g. `gdal_edit.py -a_srs EPSG:XXXX FILE`"))
    return LabelSources(rasters=rasters)


# ----- geometry -----------------------------------------------------------------------------


def raster_bounds(info: RasterInfo) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a north-up raster."""
    return Grid.from_info(info).bounds


def _overlaps(image: RasterInfo, crs: str, bounds: tuple[float, float, float, float]) -> bool:
    """True when ``bounds`` (in ``crs``) overlap the image by more than half an image pixel each way.

    The comparison is made in the label's CRS: an image's small footprint projects there well,
    where a continental label map's footprint may not project into the image's CRS.
    """
    box = bounds_in(str(image.crs), crs, raster_bounds(image))
    if box is None:
        return False
    il, ib, ir, it = box
    half_x, half_y = (ir - il) / image.width / 2, (it - ib) / image.height / 2
    l, b, r, t = bounds
    return min(r, ir) - max(l, il) > half_x and min(t, it) - max(b, ib) > half_y


def covering_sources(image: RasterInfo, sources: LabelSources) -> LabelSources:
    """The label sources whose footprint overlaps the image (a vector file always, if it overlaps)."""
    if sources.vector is not None:
        v = sources.vector
        return LabelSources(vector=v) if _overlaps(image, v.crs, v.bounds) else LabelSources()
    return LabelSources(rasters=[r for r in sources.rasters if _overlaps(image, r.crs, raster_bounds(r))])  # type: ignore[arg-type]


def same_lattice(image: RasterInfo, label: RasterInfo) -> tuple[int, int] | None:
    """(row, col) offset of the image in the label when both share CRS, pixel size and pixel lattice."""
    return Grid.from_info(image).lattice_offset(Grid.from_info(label))


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


def numeric_first(text: str) -> tuple[int, float, str]:
    """Sort key of raw label values as text: numbers by value first, then names."""
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)
