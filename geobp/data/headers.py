"""Raster headers of a whole dataset: read in parallel, cached beside the data.

Opening a GeoTIFF to read its header costs a few file-system round trips; a dataset of
thousands of scenes on a cluster's shared file system pays them thousands of times at every
start. :func:`read_headers` opens the files from a thread pool (GDAL releases the GIL while it
opens and parses) and keeps the headers in ``<cache>/headers.json``, keyed by each file's path,
size and modification time, so a later start reads only the files that changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from geobp.atomic import atomic_write_text
from geobp.cores import usable_cores
from geobp.errors import GeobpError
from geobp.raster import RasterInfo, read_info
from geobp.sources.urls import is_remote, stable_key

HEADERS_FILE = "headers.json"
#: 2: RasterInfo gained ``descriptions`` (band names); older caches are read again.
HEADERS_VERSION = 2


def _stamp(path: str) -> list[int] | list[str] | None:
    if is_remote(path):  # taken as immutable (see geobp.sources.locations.file_stamp)
        return ["remote"]
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _cache_key(path: str) -> str:
    """A file's key in ``headers.json``: its absolute path, or a URL without its signature (never written down)."""
    return stable_key(path) if is_remote(path) else os.path.abspath(path)


def read_headers(
    paths: Sequence[str | Path], cache_dir: str | Path | None = None, workers: int | None = None
) -> dict[str, RasterInfo | GeobpError]:
    """The :class:`RasterInfo` of every path, or the geobp error its opening raised.

    Args:
        paths: rasters to read.
        cache_dir: folder of ``headers.json`` (created when missing); no cache when None. A
            cache that cannot be read or written is ignored.
        workers: threads opening files; default ``min(16, 2 x cores)``.

    Returns:
        Path (as given, as a string) to its header or error. Errors are not cached.
    """
    keys = [str(p) for p in paths]
    cache_file = Path(cache_dir) / HEADERS_FILE if cache_dir is not None else None
    cached: dict[str, dict] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            doc = json.loads(cache_file.read_text())
            if doc.get("version") == HEADERS_VERSION:
                cached = doc.get("headers", {})
        except (OSError, ValueError):
            cached = {}
    stamps = {k: _stamp(k) for k in keys}
    out: dict[str, RasterInfo | GeobpError] = {}
    todo = []
    for k in keys:
        entry = cached.get(_cache_key(k))
        if entry is not None and stamps[k] is not None and entry.get("stamp") == stamps[k]:
            info = dict(entry["info"])
            info["path"] = k
            info["transform"] = tuple(info["transform"])
            info["descriptions"] = tuple(info["descriptions"])
            out[k] = RasterInfo(**info)
        else:
            todo.append(k)

    def one(path: str) -> RasterInfo | GeobpError:
        try:
            return read_info(path)
        except GeobpError as err:
            return err

    if todo:
        n = workers or min(16, 2 * usable_cores())  # threads waiting on file reads more than on the CPU
        if len(todo) == 1 or n == 1:
            results = [one(k) for k in todo]
        else:
            with ThreadPoolExecutor(max_workers=n) as pool:
                results = list(pool.map(one, todo))
        out.update(zip(todo, results))
        if cache_file is not None:
            for k in todo:
                info = out[k]
                if isinstance(info, RasterInfo) and stamps[k] is not None:
                    cached[_cache_key(k)] = {"stamp": stamps[k], "info": {**asdict(info), "path": _cache_key(k)}}
            try:
                atomic_write_text(cache_file, json.dumps({"version": HEADERS_VERSION, "headers": cached}))
            except OSError:
                pass  # a read-only data folder: no cache
    return out
