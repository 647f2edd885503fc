"""Local paths and URLs side by side: one form for each, names, change stamps and the cache folder.

A local raster stays a :class:`~pathlib.Path`; a URL (``https://``, ``s3://``, ``gs://``, ``az://``)
becomes its GDAL path (``/vsicurl/https://...``, ``/vsis3/...``) as a ``str``, never a ``Path``
(``Path("s3://b/k")`` is ``s3:/b/k``, and a signed URL's query may hold slashes). Names (a scene's
name, an output's stem) come from the last path segment with the query string stripped.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from geobp.sources.urls import READ_OPTIONS, gdal_path, is_remote, stable_key


def location(path: str | Path) -> str | Path:
    """``path`` in the form geobp keeps it: a ``Path`` when local, its GDAL path (``str``) when remote."""
    if isinstance(path, Path):
        return path
    return gdal_path(path) if is_remote(path) else Path(path)


def file_name(path: str | Path) -> str:
    """The file name of a local path or URL, without a query string (``b04.tif`` of ``https://h/b04.tif?sig=x``)."""
    if not is_remote(path):
        return Path(path).name
    text = str(path).split("?", 1)[0].split("#", 1)[0].rstrip("/")
    return text.rsplit("/", 1)[-1]


def file_stem(path: str | Path) -> str:
    """:func:`file_name` without its last suffix (``b04`` of ``s3://b/scenes/b04.tif``)."""
    name = file_name(path)
    stem, dot, _suffix = name.rpartition(".")
    return stem if dot and stem else name


def file_stamp(path: str | Path) -> str:
    """What changes when a raster changes, for cache keys.

    A local file: its resolved path, size and modification time. A remote one: its
    :func:`~geobp.sources.urls.stable_key` (the URL without signature or expiry), so a refreshed
    signed URL finds the same cache; remote objects are taken as immutable (a rewritten object needs
    a new name, or its cache entries removed from ``data.cache_dir``).

    Raises:
        OSError: a local file that cannot be read.
    """
    if is_remote(path):
        return f"remote|{stable_key(path)}"
    st = os.stat(path)
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/geobp``, or ``~/.cache/geobp``: where the caches of remote data go."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "geobp"


def remote_cache_root(paths: Sequence[str | Path]) -> Path:
    """The local cache folder of a remote dataset: one sub-folder of :func:`default_cache_dir` per
    dataset, named after the :func:`~geobp.sources.urls.stable_key` of its files (so a refreshed
    signature keeps it)."""
    digest = hashlib.sha1("\n".join(sorted(stable_key(p) for p in paths)).encode()).hexdigest()[:16]
    return default_cache_dir() / f"remote-{digest}"


def cache_root(paths: Sequence[str | Path], cache_dir: str | Path | None, fallback: str | Path | None = None) -> Path:
    """Where a dataset's ``.geobp_cache/`` goes.

    ``cache_dir`` when given; else :func:`remote_cache_root` when any file is remote (an object
    store is not writable); else ``fallback``, or the first file's folder.
    """
    if cache_dir is not None:
        return Path(cache_dir)
    if any(is_remote(p) for p in paths) or (fallback is not None and is_remote(fallback)):
        return remote_cache_root(paths)
    return Path(fallback) if fallback is not None else Path(paths[0]).parent


def use_read_options() -> None:
    """Set GDAL's remote-read options (:data:`~geobp.sources.urls.READ_OPTIONS`) as environment defaults.

    Idempotent and process-wide: a variable the user set is kept; the others apply to every thread
    of this process and to the processes it starts afterwards (DataLoader workers, inference
    readers). ``rasterio.Env`` options would hold for one thread only.
    """
    for key, value in READ_OPTIONS.items():
        os.environ.setdefault(key, value)
