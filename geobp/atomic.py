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


class AtomicFile:
    """A temporary file beside ``final``, for writers that create it in one call and finish it in
    another: :meth:`commit` renames it to ``final``, :meth:`abort` deletes it (``final`` untouched).

    The temporary file exists (empty) once this is made, with the permissions of a normal new file
    (mkstemp's are owner-only).

    Args:
        final: the destination; its folder is created when missing.
        suffix: the temporary name's ending (drivers that pick a format by extension need it).
    """

    def __init__(self, final: str | Path, suffix: str = ".tif") -> None:
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.final.stem}.", suffix=f".part{suffix}", dir=self.final.parent)
        os.close(fd)
        self.path = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        self.path.chmod(0o666 & ~umask)

    def commit(self) -> Path:
        """Rename the temporary file to :attr:`final`; returns :attr:`final` (on failure the temporary
        file is deleted)."""
        try:
            os.replace(self.path, self.final)
        except BaseException:
            self.abort()
            raise
        return self.final

    def abort(self) -> None:
        """Delete the temporary file (nothing after :meth:`commit`); safe to call twice."""
        self.path.unlink(missing_ok=True)


@contextmanager
def atomic_path(final: str | Path, suffix: str = ".tif") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` only if the block succeeds.

    An exception inside the block leaves ``final`` untouched and removes the temporary file
    (:class:`AtomicFile`, whose arguments these are).
    """
    target = AtomicFile(final, suffix)
    try:
        yield target.path
        target.commit()
    finally:
        target.abort()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix or ".tmp") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
