"""Raster I/O on rasterio: open with clear errors, describe, compare grids, derive output profiles.

This is the bottom layer: it knows files and rasterio, nothing about tiles, models or training.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from geobp.errors import (
    DataNotFoundError,
    GeoreferenceError,
    RasterMismatchError,
    RasterReadError,
    TooManyOpenFilesError,
    format_error,
)
from geobp.sources.locations import use_read_options
from geobp.sources.stackpath import is_stack_path
from geobp.sources.urls import check_remote, gdal_path, is_remote, list_prefix

#: Relative tolerance used when comparing affine transforms of two rasters.
TRANSFORM_RTOL = 1e-9
#: Absolute tolerance, as a fraction of a pixel, for comparing transform origins.
ORIGIN_PIXEL_TOL = 1e-3


@dataclass(frozen=True)
class RasterInfo:
    """What geobp needs to know about one raster, read from its header only."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None
    block_height: int
    block_width: int
    #: One band description per band (None where the file has none), e.g. ``("B2", "B3", None)``.
    descriptions: tuple[str | None, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return (self.height, self.width)


#: File endings taken as GeoTIFFs when a folder is listed.
RASTER_SUFFIXES = (".tif", ".tiff")


def list_rasters(folder: str | Path) -> list[str | Path]:
    """The GeoTIFFs of ``folder``, sorted, not recursive; hidden files (``.name``, e.g. geobp's own
    temporary files and macOS ``._`` files) are left out.

    An ``s3://`` prefix is listed like a folder (:func:`geobp.sources.urls.list_prefix`); its files
    come back as GDAL paths (``/vsis3/bucket/key``, see :func:`geobp.sources.locations.location`).

    Raises:
        ConfigError: an HTTP(S), GCS or Azure folder (they cannot be listed).
        DataNotFoundError, RasterReadError: an S3 prefix that is missing, empty or denied.
    """
    if is_remote(folder):
        return [gdal_path(p) for p in list_prefix(gdal_path(folder), RASTER_SUFFIXES)]
    return [
        p for p in sorted(Path(folder).iterdir())
        if p.suffix.lower() in RASTER_SUFFIXES and p.is_file() and not p.name.startswith(".")
    ]


def open_files_limit() -> tuple[int, int]:
    """This process's (soft, hard) limit of open files; (1024, 1024) where it cannot be read."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return int(soft), int(hard)
    except (ImportError, OSError, ValueError):  # not on a POSIX system
        return 1024, 1024


def open_reader(path: str | Path, **options: str) -> rasterio.DatasetReader:
    """Open a raster for reading and return the handle (the caller closes it).

    ``options`` are GDAL open options of the driver (e.g. ``NUM_THREADS="4"`` for GeoTIFF).

    Raises:
        DataNotFoundError: the file does not exist.
        RasterReadError: the file exists but GDAL cannot open it (not a raster, truncated, empty).
        TooManyOpenFilesError: the process has as many files open as its limit allows.
    """
    path = str(path)
    if is_stack_path(path):  # a scene of several files (geobp.sources.stackpath)
        from geobp.sources.stackreader import StackReader  # here: the stack modules import this one

        use_read_options()
        return StackReader(path)  # type: ignore[return-value]
    if is_remote(path):
        return _open_remote(path, **options)
    if not os.path.exists(path):
        raise DataNotFoundError(
            format_error(path, "file not found", "check the path, or the dataset's root folder in the config")
        )
    try:
        return rasterio.open(path, **options)
    except RasterioIOError as err:
        if "Too many open files" in str(err):
            soft, _hard = open_files_limit()
            raise TooManyOpenFilesError(format_error(
                path, f"too many open files (this process may keep {soft} open: its RLIMIT_NOFILE soft limit)",
                "raise the limit before starting (`ulimit -n 65536`, or `#SBATCH --propagate=NOFILE` / LimitNOFILE), "
                "or lower data.num_workers")) from None
        size = os.path.getsize(path)
        detail = "the file is empty" if size == 0 else f"GDAL cannot read it ({err})"
        raise RasterReadError(
            format_error(path, f"not a readable raster: {detail}", "re-download or re-export the file as a GeoTIFF")
        ) from err


def _open_remote(path: str, **options: str) -> rasterio.DatasetReader:
    """Open a URL or GDAL network path with the remote-read options in effect; one-line errors."""
    use_read_options()
    vsi = gdal_path(path)
    try:
        return rasterio.open(vsi, **options)
    except RasterioIOError as err:
        check_remote(vsi)  # raises the error that names the cause (not found, denied, unreachable)
        raise RasterReadError(format_error(path, f"not a readable raster ({err})",
                                           "check that the URL points to a GeoTIFF/COG")) from None


@contextmanager
def open_raster(path: str | Path) -> Iterator[rasterio.DatasetReader]:
    """:func:`open_reader` as a context manager that closes the handle."""
    src = open_reader(path)
    try:
        yield src
    finally:
        src.close()


def describe(src: rasterio.DatasetReader) -> RasterInfo:
    """Summarise an open raster as a :class:`RasterInfo`."""
    bh, bw = src.block_shapes[0]
    return RasterInfo(
        path=str(src.name),
        width=src.width,
        height=src.height,
        count=src.count,
        dtype=str(src.dtypes[0]),
        crs=src.crs.to_string() if src.crs else None,
        transform=tuple(src.transform)[:6],  # type: ignore[arg-type]
        nodata=src.nodata,
        block_height=bh,
        block_width=bw,
        descriptions=tuple(d.strip() or None if d else None for d in src.descriptions),
    )


def read_info(path: str | Path) -> RasterInfo:
    """Open ``path`` and return its :class:`RasterInfo` (header only, no pixels read)."""
    with open_raster(path) as src:
        return describe(src)


def check_georeferenced(info: RasterInfo) -> None:
    """Require a CRS and a north-up transform.

    Raises:
        GeoreferenceError: no CRS, identity transform, or rotation terms in the transform.
    """
    a, b, _c, d, e, _f = info.transform
    if info.crs is None:
        raise GeoreferenceError(
            format_error(info.path, "raster has no CRS", "assign one, e.g. `gdal_edit.py -a_srs EPSG:XXXX FILE`")
        )
    if b != 0.0 or d != 0.0:
        raise GeoreferenceError(
            format_error(
                info.path,
                f"transform is rotated (row/column rotation terms {b}, {d}); geobp needs north-up rasters",
                "warp it north-up first, e.g. `gdalwarp FILE north_up.tif`",
            )
        )
    if a <= 0 or e >= 0:
        raise GeoreferenceError(
            format_error(
                info.path,
                f"transform is not north-up (pixel size x={a}, y={e}; expected x>0, y<0)",
                "warp it north-up first, e.g. `gdalwarp FILE north_up.tif`",
            )
        )


def check_same_grid(image: RasterInfo, mask: RasterInfo) -> None:
    """Require ``mask`` to lie on the same pixel grid as ``image``.

    Transforms are compared with a tolerance (a small fraction of a pixel), never with ``==``.

    Raises:
        RasterMismatchError: CRS, shape or transform differ; the message names both files and the values.
    """
    fix = "re-export the mask on the image's grid, e.g. `gdalwarp -tr XRES YRES -te ... -t_srs CRS`"
    if image.crs != mask.crs:
        raise RasterMismatchError(
            format_error(mask.path, f"CRS differs from its image {image.path} (expected {image.crs}, found {mask.crs})", fix)
        )
    if image.shape != mask.shape:
        raise RasterMismatchError(
            format_error(
                mask.path,
                f"shape differs from its image {image.path} (expected {image.height}x{image.width}, "
                f"found {mask.height}x{mask.width})",
                fix,
            )
        )
    pixel = max(abs(image.transform[0]), abs(image.transform[4]), 1e-12)
    for i, (a, b) in enumerate(zip(image.transform, mask.transform)):
        tol = ORIGIN_PIXEL_TOL * pixel if i in (2, 5) else TRANSFORM_RTOL * max(abs(a), abs(b), 1e-12)
        if not math.isclose(a, b, rel_tol=0.0, abs_tol=tol):
            raise RasterMismatchError(
                format_error(
                    mask.path,
                    f"transform differs from its image {image.path} (expected {image.transform}, found {mask.transform})",
                    fix,
                )
            )


def read_window(
    src: rasterio.DatasetReader,
    window: Window,
    indexes: list[int] | int | None = None,
    fill: float = 0,
) -> np.ndarray:
    """Read ``window`` from ``src``; the parts outside the raster are filled with ``fill``.

    Windows fully inside the raster are read directly (no boundless VRT, which is slow);
    windows that stick out are read clamped and padded in numpy.

    Raises:
        RasterReadError: a block failed to decode; the message names the file and window.
    """
    row, col = int(window.row_off), int(window.col_off)
    h, w = int(window.height), int(window.width)
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + h, src.height), min(col + w, src.width)
    try:
        if (r0, c0, r1, c1) == (row, col, row + h, col + w):
            return src.read(indexes, window=Window(col, row, w, h))
        inner = src.read(indexes, window=Window(c0, r0, max(c1 - c0, 0), max(r1 - r0, 0)))
    except RasterioIOError as err:
        raise RasterReadError(
            format_error(
                src.name,
                f"failed to read window (row {row}, col {col}, {h}x{w}): {err}",
                "the file is probably truncated or corrupt; re-download it or remove the scene",
            )
        ) from err
    out = np.full(inner.shape[:-2] + (h, w), fill, dtype=inner.dtype)
    out[..., r0 - row : r1 - row, c0 - col : c1 - col] = inner
    return out


def derive_profile(src_profile: dict[str, Any], **updates: Any) -> dict[str, Any]:
    """Derive an output GeoTIFF profile from a source profile: same grid, tiled and compressed.

    Args:
        src_profile: ``src.profile`` of the input raster.
        **updates: keys to override (``count``, ``dtype``, ``nodata`` ...).

    Returns:
        A new profile dict; the source is not modified.
    """
    profile = dict(src_profile)
    profile.update(driver="GTiff", tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    profile.pop("photometric", None)
    profile.update(updates)
    # GDAL needs block sizes that are multiples of 16 and tiles no larger than needed.
    for key in ("blockxsize", "blockysize"):
        profile[key] = max(16, int(profile[key]) // 16 * 16)
    return profile


@functools.lru_cache(maxsize=64)
def _transformer(src_wkt: str, dst_wkt: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs(src_wkt, dst_wkt, always_xy=True)


def project_bounds(src_crs: Any, dst_crs: Any, left: float, bottom: float, right: float, top: float,
                   densify_pts: int = 21) -> tuple[float, float, float, float]:
    """``(left, bottom, right, top)`` in ``src_crs`` as a bounding box in ``dst_crs``, edges densified.

    The same box as ``rasterio.warp.transform_bounds`` (both are PROJ's), through a pyproj
    transformer kept per pair of CRSs: rasterio builds the transformation again on every call,
    costly for a datum change such as EPSG:3035 to UTM, and label alignment would pay it per label
    file, image and strip (the timing: BENCHMARKS.md, section 4).

    Raises:
        pyproj.exceptions.ProjError: the box cannot be projected (outside the CRS's domain).
    """
    src = CRS.from_user_input(src_crs).to_wkt()
    dst = CRS.from_user_input(dst_crs).to_wkt()
    return tuple(_transformer(src, dst).transform_bounds(left, bottom, right, top, densify_pts=densify_pts))  # type: ignore[return-value]
