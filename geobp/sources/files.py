"""Opening the files of BandRefs: local paths and GDAL virtual paths, headers, and this process's open datasets.

Files are opened lazily, in the process that reads, and kept open (up to a bound derived from the
process's open-files limit): a forked DataLoader worker starts with none of its parent's handles.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import rasterio
from rasterio.errors import RasterioIOError

from geobp.errors import RasterReadError, format_error
from geobp.handles import default_capacity
from geobp.raster import RasterInfo, check_georeferenced, describe, open_reader
from geobp.sources.locations import use_read_options
from geobp.sources.urls import is_remote

__all__ = ["DATASETS", "OpenDatasets", "close_datasets", "is_inline_vrt", "is_virtual", "local_path", "open_band_file",
           "read_header"]


def is_virtual(path: str) -> bool:
    """A GDAL virtual path (``/vsicurl/...``) or an inline VRT: no local file to check first."""
    return path.startswith("/vsi") or is_inline_vrt(path)


def is_inline_vrt(path: str) -> bool:
    """An inline VRT (a mosaic), which cannot be named as another VRT's source file."""
    return path.lstrip().startswith("<")


def open_band_file(path: str) -> rasterio.DatasetReader:
    """Open a BandRef's file: :func:`geobp.raster.open_reader` for a local path, rasterio for a GDAL
    virtual path (errors in geobp's one-line form either way).

    Raises:
        DataNotFoundError: a local file does not exist.
        RasterReadError: GDAL cannot open it.
    """
    if not is_virtual(path):
        return open_reader(path)
    if is_remote(path):  # before GDAL's first open of a URL: no directory listing, no side-car probes
        use_read_options()
    try:
        return rasterio.open(path)
    except RasterioIOError as err:
        name = "mosaic VRT" if is_inline_vrt(path) else path
        raise RasterReadError(format_error(name, f"GDAL cannot open it ({err})",
                                           "check the URL or path and that the file is a raster")) from err


def read_header(path: str) -> RasterInfo:
    """The :class:`~geobp.raster.RasterInfo` of a BandRef's file, checked to be georeferenced and north-up.

    Raises:
        DataNotFoundError, RasterReadError: as :func:`open_band_file`.
        GeoreferenceError: no CRS, or a rotated or not north-up transform.
    """
    src = open_band_file(path)
    try:
        info = describe(src)
    finally:
        src.close()
    info = RasterInfo(**{**info.__dict__, "path": path})
    check_georeferenced(info)
    return info


class OpenDatasets:
    """This process's open datasets (files and warped VRTs), least recently used closed first.

    Not thread-safe (rasterio's handles are not either). Keyed by what the dataset is (a file, or
    files warped onto a grid with a resampling). A new
    process (a forked DataLoader worker) starts empty: the handles its parent left in its memory
    are dropped, never read. Capacity: half of :func:`geobp.handles.default_capacity` (a warped VRT
    keeps its source open too).
    """

    def __init__(self) -> None:
        self._pid = -1
        self._open: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.capacity = 0

    def get(self, key: tuple[Any, ...], opener: Callable[[], Any]) -> Any:
        """The open dataset of ``key``, opened by ``opener`` when this process has none."""
        if self._pid != os.getpid():
            self._open = OrderedDict()
            self._pid = os.getpid()
            self.capacity = max(2, default_capacity() // 2)
        dataset = self._open.pop(key, None)
        if dataset is None:
            while len(self._open) >= self.capacity:
                self._open.popitem(last=False)[1].close()
            dataset = opener()
        self._open[key] = dataset
        return dataset

    def close(self) -> None:
        """Close every dataset this process holds."""
        if self._pid == os.getpid():
            while self._open:
                self._open.popitem(last=False)[1].close()


DATASETS = OpenDatasets()


def close_datasets() -> None:
    """Close the files and warped datasets that stacks hold open in this process."""
    DATASETS.close()


def local_path(path: str) -> str:
    """A path as a VRT names its source: absolute for a local file (the VRT lives in memory)."""
    return path if is_virtual(path) else os.path.abspath(path)
