"""Atomic file writes: a finished file appears under its name, or nothing does.

The one helper for every file geobp writes (rasters, caches, reports, benchmark results): write to
a temporary name in the destination folder, then ``os.replace`` it into place. A failure or a
kill in between leaves the destination as it was and no temporary file behind (except after a
kill, where a hidden ``.<name>.*.part*`` file may remain).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(final: str | Path, suffix: str = ".tif") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` only if the block succeeds.

    The temporary file exists (empty) when the block starts, with the permissions of a normal new
    file (mkstemp's are owner-only). An exception inside the block leaves ``final`` untouched and
    removes the temporary file.

    Args:
        final: the destination; its folder is created when missing.
        suffix: the temporary name's ending (drivers that pick a format by extension need it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".part{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix or ".tmp") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
