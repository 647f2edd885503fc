"""Streaming sliding-window inference over rasters, for any ``nn.Module``.

- :func:`predict_raster`: one raster, any model, overlapping tiles blended with smooth weights.
- :class:`PredictOptions`: every prediction option, checked once; both functions take one
  (or its fields as keywords, :func:`predict_options`).
- :func:`predict_many`: many rasters (or folders) with one checkpoint; failures are collected.

Output naming and format: see :mod:`geobp.inference.outputs`; to add an output format, see
:mod:`geobp.inference.sinks`.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module defining it; imported on first use, so that the torch-free
#: :mod:`geobp.inference.choices` can be imported (by the CLI's parsers) without torch
_EXPORTS = {
    "InferenceSummary": "batch", "class_map_path": "batch", "expand_inputs": "batch", "predict_many": "batch",
    "output_paths": "sinks",
    "PredictOptions": "predict", "predict_options": "predict", "predict_raster": "predict",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'geobp.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(f"geobp.inference.{_EXPORTS[name]}"), name)
