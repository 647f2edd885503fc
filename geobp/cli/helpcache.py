"""The help pages of ``geobp fit``, ``validate`` and ``test``, kept in a cache so that they print without torch.

LightningCLI builds its help from the signatures of the model, the data module, the trainer and
the callbacks, which means importing torch and Lightning (seconds). The page is written once to
``$XDG_CACHE_HOME/geobp`` (else ``~/.cache/geobp``) under a key made of geobp's version, the sizes
and modification times of geobp's source files, the Lightning and jsonargparse versions and the
terminal width; any change of these makes a new key, and the page is built again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import geobp
from geobp.atomic import atomic_write_text

#: The geobp package folder, whose source files key the cache.
PACKAGE_ROOT = Path(geobp.__file__).resolve().parent


def cache_dir() -> Path:
    """Where the help pages are kept: ``$XDG_CACHE_HOME/geobp``, else ``~/.cache/geobp``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "geobp"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def source_fingerprint(root: Path = PACKAGE_ROOT) -> str:
    """A hash of the path, size and modification time of every ``.py`` and ``.yaml`` file under ``root``."""
    h = hashlib.sha256()
    for path in sorted(p for suffix in ("*.py", "*.yaml") for p in root.rglob(suffix)):
        st = path.stat()
        h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def help_key(verb: str, root: Path = PACKAGE_ROOT, columns: int | None = None) -> str:
    """The cache key of ``verb``'s help page (16 hex digits)."""
    parts = {
        "verb": verb, "geobp": geobp.__version__, "sources": source_fingerprint(root),
        "lightning": _version("lightning"), "jsonargparse": _version("jsonargparse"),
        "columns": columns if columns is not None else shutil.get_terminal_size().columns,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def generate_help(verb: str) -> str:
    """Build ``geobp VERB --help`` with LightningCLI (imports torch and Lightning) and return its text."""
    from geobp.cli.train import lightning

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            lightning([verb, "--help"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise
    return out.getvalue()


def cached_help(verb: str, generate: Callable[[str], str] = generate_help, key: str | None = None) -> str:
    """``verb``'s help page: from the cache when its key is there, else built, stored and returned.

    A cache that cannot be written (a read-only home) only costs the time to build the page.
    """
    key = key or help_key(verb)
    folder = cache_dir()
    path = folder / f"help-{verb}-{key}.txt"
    try:
        return path.read_text()
    except OSError:
        pass
    text = generate(verb)
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        for stale in folder.glob(f"help-{verb}-*.txt"):
            if stale != path:
                stale.unlink(missing_ok=True)
    return text


def print_help(verb: str) -> int:
    """Print ``geobp VERB --help`` for a LightningCLI verb (from the cache when it is fresh); 0."""
    print(cached_help(verb), end="")
    return 0
