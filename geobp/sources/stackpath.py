"""Stack paths: a scene built from several files (a STAC item, several sources) named by one string.

Everything in geobp that takes a raster takes a path: headers, statistics, validity, the tile
dataset, ``geobp infer``, scoring. A scene whose bands come from several files, grids and sensors
joins them at that one point: it is named by a **stack path**, ``geobp-stack:`` followed by the JSON
of its :class:`~geobp.sources.stack.SceneStack` (grid, bands, files), which
:func:`geobp.raster.open_reader` opens as a rasterio-like reader
(:class:`~geobp.sources.stackreader.StackReader`). A stack path carries everything needed to read
the scene, so it crosses process boundaries (DataLoader workers, inference reader processes,
spawned scans) as any path does, and no file is written for it: a signed URL inside it is held in
memory only and shown nowhere (:func:`display`).

This module works on the strings only (it sits below :mod:`geobp.sources.urls`).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["PREFIX", "display", "is_stack_path", "members", "parse", "stack_name"]

#: What a stack path starts with.
PREFIX = "geobp-stack:"


def is_stack_path(path: str | Path | Any) -> bool:
    """Whether ``path`` names a stacked scene."""
    return isinstance(path, str) and path.startswith(PREFIX)


@lru_cache(maxsize=256)
def parse(path: str) -> dict[str, Any]:
    """The JSON document of a stack path (cached: a process parses each stack once)."""
    return json.loads(path[len(PREFIX):])


def stack_name(path: str) -> str:
    """The scene's name (a STAC item id, or the reference file's stem)."""
    return str(parse(path)["name"])


def members(path: str) -> list[str]:
    """Every file a stack path reads (GDAL paths; signed URLs with their signature), in order."""
    return list(dict.fromkeys(f for band in parse(path)["bands"] for part in band["parts"] for f in part["files"]))


def display(path: str) -> str:
    """How a stack path is shown in messages: ``<name> (stack of N files)``, no file URL in it."""
    n = len(members(path))
    return f"{stack_name(path)} (stack of {n} file{'s' if n != 1 else ''})"


def digest(path: str, member_key: Any) -> str:
    """A short hash of a stack path with each member file replaced by ``member_key(file)`` (a
    signature-free key or a local file's stamp): the stack's cache key."""
    doc = parse(path)
    keyed = {**doc, "bands": [{**b, "parts": [{**p, "path": "", "files": [member_key(f) for f in p["files"]]}
                                               for p in b["parts"]]} for b in doc["bands"]]}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
