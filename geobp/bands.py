"""Band names: how they are compared, the placeholder names of undescribed bands, and reading a
raster's bands in a model's order by name.

Files name their bands in the GeoTIFF band descriptions (Sentinel-2 exports say ``B2``,
``B8A``); a model remembers the names of the bands it was trained on, in its input order.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from geobp.errors import BandMismatchError, format_error

_DEFAULT = re.compile(r"^band_\d+$")


def canonical_band(name: str) -> str:
    """The band name as compared: lower case, zeros leading a number dropped (``B08A`` -> ``b8a``)."""
    return re.sub(r"(?<!\d)0+(?=\d)", "", name.strip().lower())


def default_band_name(index: int) -> str:
    """The name of an undescribed band: ``band_<index>`` (1-based, as GDAL counts bands)."""
    return f"band_{index}"


def band_number(key: str | int, names: Sequence[str], count: int) -> int | None:
    """The 1-based number of band ``key`` among ``count`` bands named ``names``, or None when none has it.

    ``key`` is a number (returned as it is: the caller checks its range), a band name (exact, else
    case-insensitive), or :func:`default_band_name` of a band (``band_3``), whatever its name.
    """
    text = str(key)
    if isinstance(key, int) or text.isdigit():
        return int(text)
    if text in names:
        return list(names).index(text) + 1
    lower = [n.lower() for n in names]
    if text.lower() in lower:
        return lower.index(text.lower()) + 1
    defaults = [default_band_name(i) for i in range(1, count + 1)]
    return defaults.index(text.lower()) + 1 if text.lower() in defaults else None


def is_default_name(name: str) -> bool:
    """Whether ``name`` is a placeholder (:func:`default_band_name`) rather than a real band name."""
    return bool(_DEFAULT.match(name))


def bands_by_name(
    path: str | Path,
    descriptions: Sequence[str | None],
    bands: Sequence[int],
    model_names: Sequence[str] | None,
) -> list[int]:
    """The raster bands (1-based) to read so that the model gets the bands it was trained on, in order.

    ``bands`` are the training band numbers; they are returned unchanged when either side has
    no real names to compare (a band without a description, a model trained on placeholder
    names) or when the names at those numbers are the model's. When the raster holds the
    model's bands under other numbers (another band order), their numbers are returned in the
    model's order, with a warning.

    Raises:
        BandMismatchError: the raster names its bands and some of the model's are not among them.
    """
    if (model_names is None or len(model_names) != len(bands) or any(is_default_name(n) for n in model_names)
            or not descriptions or any(not d for d in descriptions)):
        return list(bands)
    file_names = [canonical_band(str(d)) for d in descriptions]
    wanted = [canonical_band(n) for n in model_names]
    if [file_names[b - 1] if b <= len(file_names) else None for b in bands] == wanted:
        return list(bands)
    if len(set(file_names)) != len(file_names):
        return list(bands)  # repeated descriptions: names cannot say which band is which
    missing = [n for n, c in zip(model_names, wanted) if c not in file_names]
    if missing:
        raise BandMismatchError(format_error(
            path, f"the raster's bands are {list(descriptions)}; the model was trained on {list(model_names)} "
            f"and {missing} are not among them",
            "pass a raster with the training bands, or, if the names differ but the bands are the same, "
            "use --match_bands order to read bands " + ", ".join(map(str, bands)) + " as numbered"))
    found = [file_names.index(c) + 1 for c in wanted]
    warnings.warn(
        f"{path}: bands {found} hold the model's bands {list(model_names)} (named in another order than in "
        f"training); reading them in the model's order", UserWarning, stacklevel=2)
    return found
