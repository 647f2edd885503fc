"""A bounded cache of open rasters: datasets of any number of scenes under any open-files limit.

A DataLoader worker reads tiles of many scenes; reopening a GeoTIFF for every tile costs its
header parse, so handles are kept open, but not all of them: a worker of a 10,000-scene dataset
would otherwise hold 20,000 files (image and mask) open and die at the first common limit
(1024). :class:`HandleCache` keeps the most recently used ones, up to a capacity derived from
the process's own limit.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import rasterio

from geobp.errors import TooManyOpenFilesError
from geobp.raster import open_files_limit, open_reader

#: Files a process keeps for itself besides cached rasters: Python and its libraries, the
#: DataLoader's pipes, and the shared-memory descriptors of batches in flight.
RESERVED_FILES = 64


def default_capacity(soft_limit: int | None = None) -> int:
    """Rasters a process may keep open: half of what its open-files limit leaves after
    :data:`RESERVED_FILES` and a quarter of the limit for everything else, between 4 and 512."""
    soft = open_files_limit()[0] if soft_limit is None else soft_limit
    spare = soft - max(RESERVED_FILES, soft // 4)
    return int(min(512, max(4, spare // 2)))


class HandleCache:
    """Open rasters by path, least recently used closed first beyond ``capacity``.

    Not shared between processes: pickling (a DataLoader worker's copy) drops the handles, and
    each process opens its own. Not thread-safe (rasterio handles are not either).

    Args:
        capacity: rasters kept open; None: :func:`default_capacity` of this process's limit,
            decided when the first file is opened (in the process that reads).
        **open_options: GDAL open options for every file (see :func:`geobp.raster.open_reader`).
    """

    def __init__(self, capacity: int | None = None, **open_options: str) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 (found {capacity})")
        self.capacity = capacity
        self.open_options = open_options
        self._open: OrderedDict[str, rasterio.DatasetReader] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self._open)

    def get(self, path: str | Path) -> rasterio.DatasetReader:
        """The open handle of ``path`` (opened, or reused and marked most recently used).

        Raises:
            DataNotFoundError, RasterReadError: as :func:`geobp.raster.open_reader`.
            TooManyOpenFilesError: the limit is reached even with this cache's other files
                closed (other code holds them): the message says which limit to raise.
        """
        key = str(path)
        src = self._open.pop(key, None)
        if src is None:
            if self.capacity is None:
                self.capacity = default_capacity()
            while len(self._open) >= self.capacity:
                self._evict()
            src = self._open_retrying(key)
        self._open[key] = src
        return src

    def _open_retrying(self, path: str) -> rasterio.DatasetReader:
        try:
            return open_reader(path, **self.open_options)
        except TooManyOpenFilesError:
            if not self._open:
                raise
            # the limit is lower than the capacity assumed (other files are open): keep fewer
            for _ in range(max(1, len(self._open) // 2)):
                self._evict()
            self.capacity = max(1, len(self._open))
            return open_reader(path, **self.open_options)

    def _evict(self) -> None:
        _path, src = self._open.popitem(last=False)
        src.close()

    def close(self) -> None:
        """Close every cached handle."""
        while self._open:
            self._evict()
