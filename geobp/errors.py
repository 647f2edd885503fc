"""geobp's exceptions: one root, and leaves that also subclass the matching built-in.

Messages follow one form, ``"PATH: what is wrong (expected X, found Y). Fix: ..."``,
so that a user reading a single line knows which file to look at and what to do.
"""

from __future__ import annotations

from pathlib import Path


class GeobpError(Exception):
    """Root of every error geobp raises on purpose."""


def format_error(path: str | Path | None, problem: str, fix: str) -> str:
    """Build the one-line message used by every geobp error.

    Args:
        path: the file or folder the problem is about (omitted from the message when None).
        problem: what is wrong, ideally with "expected X, found Y".
        fix: what the user should do about it.

    Returns:
        ``"PATH: problem. Fix: fix"``, with the credentials of any URL in it redacted
        (:func:`geobp.sources.urls.redact`): errors and warnings are logged.
    """
    from geobp.sources.urls import redact  # here, not at the top: geobp.sources imports this module

    head = f"{redact(str(path))}: " if path is not None else ""
    problem = redact(problem).rstrip(".")
    fix = redact(fix).rstrip(".")
    return f"{head}{problem}. Fix: {fix}."


class DataNotFoundError(GeobpError, FileNotFoundError):
    """A file or folder geobp needs does not exist or holds nothing usable."""


class RasterReadError(GeobpError, OSError):
    """A raster could not be opened or decoded (not a TIFF, truncated, corrupt block)."""


class TooManyOpenFilesError(GeobpError, OSError):
    """The process reached its limit of open files (``RLIMIT_NOFILE``)."""


class RasterMismatchError(GeobpError, ValueError):
    """Two rasters that must share a grid (image and mask) do not: CRS, transform or shape differ."""


class BandMismatchError(GeobpError, ValueError):
    """A raster's band count or dtype does not fit what the config or checkpoint expects."""


class LabelError(GeobpError, ValueError):
    """A mask holds values outside the class range and the ignore index."""


class GeoreferenceError(GeobpError, ValueError):
    """A raster has no CRS or transform, or a rotated (not north-up) transform."""


class ConfigError(GeobpError, ValueError):
    """A configuration value is invalid or inconsistent with the data."""


class CheckpointError(GeobpError, ValueError):
    """A checkpoint is missing what geobp needs to rebuild the model and its preprocessing."""


class ExportedModelError(GeobpError, ValueError):
    """An exported model file (ONNX, TorchScript) is unreadable, not a geobp export, or its metadata is malformed."""


class OutputExistsError(GeobpError, FileExistsError):
    """An output file exists and overwriting was not asked for."""


class NonFiniteError(GeobpError, FloatingPointError):
    """Training produced a NaN or Inf loss or gradient and was configured to stop."""


class ReaderError(GeobpError, RuntimeError):
    """A reader process of inference stopped unexpectedly (killed for memory, crashed)."""


class SharedMemoryError(ReaderError):
    """Shared memory (``/dev/shm``) is too small for the reader processes of inference."""
