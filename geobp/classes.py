"""Rules about classes, labels and bands, defined once for the data, the models, the task and inference.

Bottom layer: numpy and geobp's errors only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geobp.errors import ConfigError, format_error


def default_class_names(num_classes: int) -> list[str]:
    """``class_0`` ... ``class_<K-1>``: the names of classes nobody named."""
    return [f"class_{i}" for i in range(num_classes)]


def class_names_for(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """The given names, or the defaults when None or empty.

    Raises:
        ConfigError: not one name per class.
    """
    names = list(class_names) if class_names else default_class_names(num_classes)
    if len(names) != num_classes:
        raise ConfigError(format_error(None, f"class_names has {len(names)} entries for {num_classes} classes", "give one name per class"))
    return names


def check_num_classes(num_classes: int) -> None:
    """Raises ConfigError unless there are at least two classes."""
    if num_classes < 2:
        raise ConfigError(format_error(None, f"num_classes must be >= 2 (found {num_classes})",
                                       "set data.num_classes, counting the background as a class"))


def check_in_channels(in_channels: int) -> None:
    """Raises ConfigError unless there is at least one input band."""
    if in_channels < 1:
        raise ConfigError(format_error(None, f"in_channels must be >= 1 (found {in_channels})",
                                       "set in_channels to the number of bands of the rasters"))


def invalid_labels(values: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Boolean array: where ``values`` is neither a class id in ``[0, num_classes)`` nor ``ignore_index``.

    The one rule for mask values, used by the tile loader (`geobp fit`) and by `geobp check`.
    """
    values = np.asarray(values).astype(np.int64, copy=False)
    return ((values < 0) | (values >= num_classes)) & (values != ignore_index)


def mask_dtype(num_classes: int, ignore_index: int) -> np.dtype:
    """The smallest dtype that holds every class id and the ignore index: uint8, int16, or int64."""
    lo, hi = min(0, ignore_index), max(num_classes - 1, ignore_index)
    for dtype in (np.uint8, np.int16):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)
