"""Local paths and URLs side by side: one form for each, names, change stamps and the cache folder.

A local raster stays a :class:`~pathlib.Path`; a URL (``https://``, ``s3://``, ``gs://``, ``az://``)
becomes its GDAL path (``/vsicurl/https://...``, ``/vsis3/...``) as a ``str``, never a ``Path``
(``Path("s3://b/k")`` is ``s3:/b/k``, and a signed URL's query may hold slashes). Names (a scene's
name, an output's stem) come from the last path segment with the query string stripped.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from geobp.errors import ConfigError, DataNotFoundError, format_error
from geobp.sources import stackpath
from geobp.sources.urls import READ_OPTIONS, gdal_path, is_remote, list_prefix, redact, stable_key


def location(path: str | Path) -> str | Path:
    """``path`` in the form geobp keeps it: a ``Path`` when local, its GDAL path (``str``) when remote."""
    if isinstance(path, Path):
        return path
    if stackpath.is_stack_path(path):
        return path
    return gdal_path(path) if is_remote(path) else Path(path)


def file_name(path: str | Path) -> str:
    """The file name of a local path or URL, without a query string (``b04.tif`` of ``https://h/b04.tif?sig=x``);
    a stack path's scene name."""
    if stackpath.is_stack_path(path):
        return stackpath.stack_name(str(path))
    if not is_remote(path):
        return Path(path).name
    text = str(path).split("?", 1)[0].split("#", 1)[0].rstrip("/")
    return text.rsplit("/", 1)[-1]


def is_folder_url(url: str | Path) -> bool:
    """Whether a URL names a folder (a prefix to list): it ends with ``/``, or its last segment has no suffix."""
    return str(url).split("?", 1)[0].endswith("/") or "." not in file_name(url)


def file_stem(path: str | Path) -> str:
    """:func:`file_name` without its last suffix (``b04`` of ``s3://b/scenes/b04.tif``)."""
    name = file_name(path)
    if stackpath.is_stack_path(path):
        return name
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
    if stackpath.is_stack_path(path):  # its files' stamps
        return f"stack|{stackpath.stack_name(str(path))}|{stackpath.digest(str(path), file_stamp)}"
    if is_remote(path):
        return f"remote|{stable_key(path)}"
    st = os.stat(path)
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/geobp``, or ``~/.cache/geobp``: where the caches of remote data go."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "geobp"


def folder_of(path: str | Path) -> str | Path:
    """The folder holding ``path``: a ``Path``, or for a URL or GDAL path the text before its file name."""
    if stackpath.is_stack_path(path):
        return folder_of(stackpath.members(str(path))[0])
    if not is_remote(path):
        return Path(path).parent
    return str(path).split("?", 1)[0].rstrip("/").rsplit("/", 1)[0]


def join(folder: str | Path, name: str) -> str | Path:
    """``folder / name`` for a local folder, ``folder/name`` for a URL or GDAL path (kept as ``str``)."""
    if not is_remote(folder):
        return Path(folder) / name
    return f"{str(folder).rstrip('/')}/{name}"


def cache_root(paths: Sequence[str | Path], cache_dir: str | Path | None = None,
               fallback: str | Path | None = None) -> Path:
    """The folder that holds a dataset's ``.geobp_cache/``.

    ``cache_dir`` when given; else :func:`default_cache_dir` when the data is remote (any of
    ``paths``, or ``fallback``: an object store is not writable); else ``fallback``, or the first
    file's folder. Every cache file is keyed by its files' :func:`file_stamp`, so datasets may
    share the default folder.

    Raises:
        ConfigError: ``cache_dir`` is a URL.
    """
    if cache_dir is not None:
        if is_remote(cache_dir):
            raise ConfigError(format_error(cache_dir, "the cache folder must be local (geobp writes it while it reads)",
                                           "set data.cache_dir to a local folder, or leave it out for ~/.cache/geobp"))
        return Path(cache_dir)
    if (fallback is not None and is_remote(fallback)) or any(is_remote(p) for p in paths):
        return default_cache_dir()
    return Path(fallback) if fallback is not None else Path(folder_of(paths[0]))


def redacted(spec: Any) -> Any:
    """A path, URL or list of them (``data.images``, ``data.labels``) with every signature redacted
    (:func:`~geobp.sources.urls.redact`), for what is written down: saved hyperparameters and configs."""
    if isinstance(spec, (str, Path)):
        return redact(str(spec)) if is_remote(spec) else spec
    if isinstance(spec, (list, tuple)):
        return type(spec)(redacted(s) for s in spec)
    if isinstance(spec, Mapping):  # several sources: {s2: ..., s1: {images: ...}}
        return {k: redacted(v) for k, v in spec.items()}
    return spec


def use_read_options() -> None:
    """Set GDAL's remote-read options (:data:`~geobp.sources.urls.READ_OPTIONS`) as environment defaults.

    Idempotent and process-wide: a variable the user set is kept; the others apply to every thread
    of this process and to the processes it starts afterwards (DataLoader workers, inference
    readers). ``rasterio.Env`` options would hold for one thread only.
    """
    for key, value in READ_OPTIONS.items():
        os.environ.setdefault(key, value)


def expand_paths(spec: str | Path | Sequence[str | Path], suffixes: tuple[str, ...], what: str) -> list[str | Path]:
    """A folder (its files with ``suffixes``, not recursive), a glob, a file, or a list of them.

    A URL (``https://``, ``s3://``, ``gs://``, ``az://``) is a file when its name has a suffix, else
    a folder: an ``s3://`` prefix is listed (other stores cannot be); globs are local only. URLs come
    back as GDAL paths (``str``, see :func:`geobp.sources.locations.location`), local files as ``Path``.

    Raises:
        DataNotFoundError: a path does not exist, or nothing matches.
        ConfigError: a folder URL that cannot be listed (HTTP, GCS, Azure).
    """
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[str | Path] = []
    for item in items:
        text = str(item)
        if stackpath.is_stack_path(text):  # a stacked scene (geobp.sources.imagery): a file
            out.append(text)
        elif is_remote(text):
            if is_folder_url(text):
                out += [gdal_path(p) for p in list_prefix(gdal_path(text), suffixes)]
            else:
                out.append(gdal_path(text))
        elif any(c in text for c in "*?["):
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
