"""Streaming sliding-window inference over rasters, for any ``nn.Module``.

- :func:`predict_raster`: one raster, any model, overlapping tiles blended with smooth weights.
- :class:`PredictOptions`: every prediction option, checked once; both functions take one
  (or its fields as keywords, :func:`predict_options`).
- :func:`predict_many`: many rasters (or folders) with one checkpoint; failures are collected.

The outputs (naming, format) and the place to add an output format: :mod:`geobp.inference.sinks`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from geobp.inference.batch import InferenceSummary, class_map_path, expand_inputs, predict_many
    from geobp.inference.options import PredictOptions, predict_options
    from geobp.inference.predict import predict_raster
    from geobp.inference.sinks import output_paths

#: public name -> the module defining it; imported on first use, so that the torch-free
#: :mod:`geobp.inference.options` can be imported without torch
_EXPORTS = {
    "InferenceSummary": "batch", "class_map_path": "batch", "expand_inputs": "batch", "predict_many": "batch",
    "output_paths": "sinks",
    "PredictOptions": "options", "predict_options": "options", "predict_raster": "predict",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'geobp.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(f"geobp.inference.{_EXPORTS[name]}"), name)
