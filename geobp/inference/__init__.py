"""Streaming sliding-window inference over rasters, for any ``nn.Module``.

- :func:`predict_raster`: one raster, any model, overlapping tiles blended with smooth weights.
- :class:`PredictOptions`: every prediction option, checked once; both functions take one
  (or its fields as keywords, :func:`predict_options`).
- :func:`predict_many`: many rasters (or folders) with one checkpoint; failures are collected.

Output naming and format: see :mod:`geobp.inference.outputs`; to add an output format, see
:mod:`geobp.inference.sinks`.
"""

from geobp.inference.batch import InferenceSummary, class_map_path, expand_inputs, predict_many
from geobp.inference.outputs import output_paths
from geobp.inference.predict import PredictOptions, predict_options, predict_raster

__all__ = [
    "InferenceSummary", "PredictOptions", "class_map_path", "expand_inputs", "output_paths", "predict_many", "predict_options",
    "predict_raster",
]
