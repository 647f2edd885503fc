"""Streaming sliding-window inference over rasters, for any ``nn.Module``.

- :func:`predict_raster`: one raster, any model, overlapping tiles blended with smooth weights
  (:func:`predict_with` takes the same options as one :class:`PredictOptions`).
- :func:`predict_many`: many rasters (or folders) with one checkpoint; failures are collected.

Output naming and format: see :mod:`geobp.inference.outputs`.
"""

from geobp.inference.batch import InferenceSummary, class_map_path, expand_inputs, predict_many
from geobp.inference.outputs import output_paths
from geobp.inference.predict import PredictOptions, predict_raster, predict_with

__all__ = [
    "InferenceSummary", "PredictOptions", "class_map_path", "expand_inputs", "output_paths", "predict_many", "predict_raster",
    "predict_with",
]
