"""The options of prediction: one frozen, checked :class:`PredictOptions` carried through inference.

Torch-free (``torch`` is only named in annotations), so that a command line can build and check
the options before it loads a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from geobp.errors import ConfigError, format_error
from geobp.choices import TTA, MatchBands, NormalizeOn, Precision, Probabilities, Reader, check_choice, normalize_precision
from geobp.tiling import TilingOptions

if TYPE_CHECKING:
    import torch
    from torch import nn

#: The tile size of a model that records no training tile size (``hparams["tile_size"]``).
DEFAULT_TILE_SIZE = 512


def training_tile_size(model: nn.Module) -> int | None:
    """The tile size ``model`` was trained with (``model.hparams["tile_size"]``, as a loaded
    ``SegmentationTask`` records it), or None for a model that records none."""
    hparams = getattr(model, "hparams", None)
    value = hparams.get("tile_size") if isinstance(hparams, Mapping) else None
    return int(value) if value else None


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How rasters are predicted: the one carrier of prediction options through inference.

    Every value is checked here, once, when the options are made (or changed with
    ``dataclasses.replace``); the functions that use them do not check them again.

    Attributes:
        tile_size: model input size; rasters smaller than a tile are padded by reflection.
            None (default): the model's training tile size (:func:`training_tile_size`, from the
            checkpoint), or :data:`DEFAULT_TILE_SIZE` for a model that records none.
        overlap: minimum overlap of neighbouring tiles (at least the model's receptive-field
            radius times four removes tile-edge effects; tile edges get near-zero weight
            over the outer quarter of the overlap). None (default): an eighth of the tile size.
        batch_size: tiles per forward pass (the same for every share of a split raster).
        device: torch device for the model.
        precision: ``32-true``, or ``bf16-mixed`` / ``16-mixed`` for autocast (meant for CUDA);
            ``32``, ``bf16`` and ``16`` are accepted and normalised.
        probabilities: ``none``, ``probs`` (per-class uint8 probabilities), ``confidence`` (the
            top-class probability) or ``entropy`` (the predictive entropy): the output written
            beside the class map (a sink of :data:`geobp.inference.sinks.SINKS`).
        cog: write Cloud Optimized GeoTIFFs (with overviews).
        overwrite: replace existing outputs.
        progress: show a progress bar (rich, on stderr).
        nodata_value: class-map value at nodata pixels; must not be a class id.
        num_workers: readers (threads or processes, each with its own file handle); None: see
            :func:`default_workers` (threads) and :func:`default_processes` (processes).
        reader: ``processes`` decodes and preprocesses in worker processes, which do not share
            the GIL and so use every core given (what a GPU needs); ``threads`` reads in threads
            of this process, which start at once and suffice on the CPU, where the model needs
            the cores anyway. None (default): processes on a GPU, threads on the CPU
            (:func:`reader_kind`; BENCHMARKS.md, sections 3 and 3b, holds the measurements
            behind it).
        num_classes: expected number of classes (checked against the model output), or None.
        class_names: one name per class for the tags and colours; ``class_<i>`` when None.
        expected_dtype: training data type, when known; a different input dtype is refused.
        band_names: the model's input band names (in its input order), when known.
        match_bands: ``names``: where the raster's band descriptions hold the model's band names
            under other band numbers, those bands are read (see :func:`geobp.bands.bands_by_name`);
            ``order``: the training band numbers are read whatever the descriptions say.
        normalize_on: ``reader``: the readers normalise the tiles to float32; ``device``: they
            hand over the raw pixels (fewer bytes to move for integer inputs, less reader CPU
            time) and the model's device normalises them, to the same float32 values.
            None (default): the device on CUDA, the reader elsewhere.
        tta: test-time augmentation (:mod:`geobp.inference.tta`): ``none`` (default), ``flips``
            (the class probabilities of each tile averaged over its 4 flips: 4 forward passes) or
            ``d4`` (over its 8 flips and quarter turns: 8 forward passes); the tiles are read and
            blended once.

    Raises:
        ConfigError: an invalid value (checked when the options are made).
    """

    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int = 8
    device: str | torch.device = "cpu"
    precision: Precision | str = "32-true"
    probabilities: Probabilities = "none"
    cog: bool = False
    overwrite: bool = False
    progress: bool = True
    nodata_value: int = 255
    num_workers: int | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    expected_dtype: str | None = None
    band_names: tuple[str, ...] | None = None
    match_bands: MatchBands = "names"
    reader: Reader | None = None
    normalize_on: NormalizeOn | None = None
    tta: TTA = "none"

    def __post_init__(self) -> None:
        if self.tile_size is not None:
            TilingOptions(self.tile_size, self.overlap or 0)  # the one check of a tile size and its overlap
        elif self.overlap is not None and self.overlap < 0:
            raise ConfigError(format_error(None, f"overlap must not be negative (found {self.overlap})", "set overlap >= 0"))
        if self.batch_size < 1:
            raise ConfigError(format_error(None, f"batch size must be positive (found {self.batch_size})", "set batch_size >= 1"))
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError(format_error(None, f"number of readers must be positive (found {self.num_workers})",
                                           "set --readers >= 1, or leave it out for the default"))
        if not 0 <= self.nodata_value <= 255:
            raise ConfigError(format_error(None, f"nodata value must fit uint8 (found {self.nodata_value})", "pick one in 0..255"))
        if self.num_classes is not None and self.nodata_value < self.num_classes:
            raise ConfigError(format_error(None, f"nodata value {self.nodata_value} is a class id ({self.num_classes} classes)",
                                           "pick a larger nodata value"))
        check_choice("probabilities", self.probabilities, Probabilities)
        if self.reader is not None:
            check_choice("reader", self.reader, Reader)
        if self.normalize_on is not None:
            check_choice("normalize_on", self.normalize_on, NormalizeOn)
        check_choice("match_bands", self.match_bands, MatchBands)
        check_choice("tta", self.tta, TTA)
        if self.band_names is not None:
            object.__setattr__(self, "band_names", tuple(str(n) for n in self.band_names))
        object.__setattr__(self, "precision", normalize_precision(self.precision))

    def for_model(self, model: nn.Module) -> PredictOptions:
        """These options with the tile size and overlap settled for ``model`` (see :attr:`tile_size`).

        Raises:
            ConfigError: the overlap does not fit the tile size.
        """
        tile = self.tile_size or training_tile_size(model) or DEFAULT_TILE_SIZE
        overlap = tile // 8 if self.overlap is None else self.overlap
        if (tile, overlap) == (self.tile_size, self.overlap):
            return self
        return dataclasses.replace(self, tile_size=tile, overlap=overlap)


def predict_options(options: PredictOptions | None = None, **overrides: Any) -> PredictOptions:
    """``options`` (the defaults when None) with the fields named in ``overrides`` replaced.

    The keyword path of :func:`predict_raster` and :func:`~geobp.inference.batch.predict_many`:
    ``predict_raster(model, src, dst, pre, tile_size=256)`` is
    ``predict_raster(model, src, dst, pre, PredictOptions(tile_size=256))``.

    Raises:
        ConfigError: a name that is not a field of :class:`PredictOptions`, or an invalid value.
    """
    base = options if options is not None else PredictOptions()
    if not overrides:
        return base
    fields = [f.name for f in dataclasses.fields(PredictOptions)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(format_error(None, f"unknown prediction option(s) {unknown} (expected some of {fields})",
                                       "pass the fields of PredictOptions"))
    return dataclasses.replace(base, **overrides)
