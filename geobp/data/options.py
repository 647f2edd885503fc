"""The data module's options in frozen groups, one per concern, each checking its values once.

``GeoTiffDataModule`` keeps every ``data.<name>`` option as a flat keyword (configs and the CLI
name them ``data.tile_size``, ``data.batch_size`` ...) and turns them into these groups once, in
its constructor; the rest of the class and the modules below it take whole groups. Each field's
default here is the option's one default (the constructor's signature refers to it), and each
value is checked in its group's ``__post_init__``:

=================  ==============================================================================
group              options
=================  ==============================================================================
TilingOptions      tile_size, overlap (:mod:`geobp.tiling`, shared with inference)
SamplingOptions    tiles_per_epoch, sampling, balance_power, max_nodata_fraction, augment
SplitOptions       split, val_fraction, test_fraction, split_block_size
StatsOptions       normalization, nodata, stats_budget, validity
LoaderOptions      batch_size, num_workers, prefetch_factor, on_read_error, worker_start
LabelOptions       num_classes, ignore_index, class_names, label_map, label_field, label_background,
                   all_touched (:mod:`geobp.data.labels`)
=================  ==============================================================================

The inputs (``root``, ``images``, ``labels``, ``bands``, ``band_names``, ``pretrained_weights``,
``cache_dir``) and ``seed`` are checked where they are used (they need the files).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from geobp.data.bandstats import STATS_BUDGET
from geobp.data.preprocessing import NormMethod
from geobp.data.validity import ValidityMode
from geobp.errors import ConfigError, format_error
from geobp.processes import StartMethod
from geobp.tiling import TilingOptions

SplitMode = Literal["scene", "blocks"]
SamplingMode = Literal["uniform", "balanced"]
ReadErrorPolicy = Literal["stop", "skip"]

__all__ = [
    "LoaderOptions", "ReadErrorPolicy", "SamplingMode", "SamplingOptions", "SplitMode", "SplitOptions", "StatsOptions",
    "TilingOptions", "check_choice", "check_split_tiles",
]


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Raise ConfigError unless ``value`` is one of the ``Literal`` type ``choices``.

    Raises:
        ConfigError: naming ``data.<name>``, the value and the choices.
    """
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigError(format_error(None, f"data.{name} is {value!r} (expected one of {', '.join(map(str, allowed))})",
                                       f"set data.{name} to one of them"))


@dataclass(frozen=True)
class SamplingOptions:
    """Which training tiles are drawn, and how they are shown.

    Args:
        tiles_per_epoch: random training tiles per epoch, over all ranks; at least 1.
        sampling: ``uniform`` (every place equally likely) or ``balanced`` (places holding rare
            classes more often; :func:`geobp.data.classbalance.balance_factors`).
        balance_power: how far ``balanced`` goes, in [0, 1].
        max_nodata_fraction: training tiles with more nodata than this are skipped; in [0, 1].
        augment: random flips and 90-degree rotations of training tiles.

    Raises:
        ConfigError: a value outside its range or choices.
    """

    tiles_per_epoch: int = 2000
    sampling: SamplingMode = "uniform"
    balance_power: float = 0.5
    max_nodata_fraction: float = 0.5
    augment: bool = True

    def __post_init__(self) -> None:
        if self.tiles_per_epoch < 1:
            raise ConfigError(format_error(None, f"data.tiles_per_epoch must be at least 1 (found {self.tiles_per_epoch})",
                                           "set data.tiles_per_epoch to the number of training tiles per epoch"))
        check_choice("sampling", self.sampling, SamplingMode)
        if not 0.0 <= self.balance_power <= 1.0:
            raise ConfigError(format_error(None, f"balance_power must be in [0, 1] (found {self.balance_power})",
                                           "set data.balance_power between 0 (uniform) and 1 (fully balanced)"))
        if not 0.0 <= self.max_nodata_fraction <= 1.0:
            raise ConfigError(format_error(None, f"data.max_nodata_fraction must be in [0, 1] (found {self.max_nodata_fraction})",
                                           "set it to the largest share of nodata a training tile may hold"))

    @property
    def min_valid_fraction(self) -> float:
        """The least share of valid pixels a training tile needs."""
        return 1.0 - self.max_nodata_fraction


@dataclass(frozen=True)
class SplitOptions:
    """How scenes are split into train, validation and test.

    Args:
        split: ``scene`` (whole scenes per split) or ``blocks`` (square blocks within every scene).
        val_fraction, test_fraction: shares of scenes (or blocks), each in [0, 1), summing to less than 1.
        split_block_size: block side for ``split: blocks``, in pixels (at least the tile size:
            :func:`check_split_tiles`).

    Raises:
        ConfigError: a value outside its range or choices.
    """

    split: SplitMode = "scene"
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_block_size: int = 1024

    def __post_init__(self) -> None:
        check_choice("split", self.split, SplitMode)
        v, t = self.val_fraction, self.test_fraction
        if not (0 <= v < 1 and 0 <= t < 1 and v + t < 1):
            raise ConfigError(
                format_error(None, "val_fraction and test_fraction must be in [0, 1) and sum to less than 1", "fix them in the config")
            )
        if self.split_block_size < 1:
            raise ConfigError(format_error(None, f"split block size must be positive (found {self.split_block_size})",
                                           "set split_block_size >= tile_size"))

    @property
    def fractions(self) -> tuple[float, float, float]:
        """Shares of train, validation and test."""
        return (1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction)


def check_split_tiles(split: SplitOptions, tiling: TilingOptions) -> None:
    """The one check across groups: under ``split: blocks`` a split block holds a whole tile.

    Raises:
        ConfigError: ``split_block_size < tile_size`` under ``split: blocks``.
    """
    if split.split == "blocks" and split.split_block_size < tiling.tile_size:
        raise ConfigError(format_error(
            None, f"split_block_size must be at least tile_size (found {split.split_block_size} < {tiling.tile_size})",
            "raise data.split_block_size"))


@dataclass(frozen=True)
class StatsOptions:
    """Start-up statistics: nodata, validity and band statistics, and the normalisation built on them.

    Args:
        normalization: ``meanstd`` or ``percentile``; None: the pretrained weights' own when the
            encoder starts from torchgeo weights, ``meanstd`` otherwise.
        nodata: image nodata value; the files' nodata tag when None.
        stats_budget: pixels read for the band statistics (whole blocks); 0 reads everything.
        validity: ``auto``, ``scan`` or ``at_read`` (:mod:`geobp.data.validity`).

    Raises:
        ConfigError: a value outside its range or choices.
    """

    normalization: NormMethod | None = None
    nodata: float | None = None
    stats_budget: int = STATS_BUDGET
    validity: ValidityMode = "auto"

    def __post_init__(self) -> None:
        if self.normalization is not None:
            check_choice("normalization", self.normalization, NormMethod)
        check_choice("validity", self.validity, ValidityMode)
        if self.stats_budget < 0:
            raise ConfigError(format_error(None, f"data.stats_budget must be >= 0 (found {self.stats_budget})",
                                           "set a number of pixels, or 0 to read every pixel"))

    @property
    def budget_pixels(self) -> int:
        """Pixels to read for the band statistics (``stats_budget``, or without limit for 0)."""
        return self.stats_budget if self.stats_budget > 0 else 2**62


@dataclass(frozen=True)
class LoaderOptions:
    """How the DataLoaders read tiles.

    Args:
        batch_size: tiles per batch, per rank; at least 1.
        num_workers: DataLoader worker processes per rank (kept alive between epochs); at least 0.
        prefetch_factor: batches each worker loads ahead (torch's default when None); only with
            ``num_workers > 0``, at least 1.
        on_read_error: a block that fails to decode during training stops the run (``stop``) or
            is skipped with a warning (``skip``).
        worker_start: how the worker processes start (:mod:`geobp.processes`): ``forkserver``
            (forked from a clean server process), ``spawn``, or ``fork`` (fastest to start, but a
            worker forked while another thread holds a lock can wait on it forever).

    Raises:
        ConfigError: a value outside its range or choices.
    """

    batch_size: int = 16
    num_workers: int = 0
    prefetch_factor: int | None = None
    on_read_error: ReadErrorPolicy = "stop"
    worker_start: StartMethod = "forkserver"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(format_error(None, f"data.batch_size must be at least 1 (found {self.batch_size})",
                                           "set data.batch_size to the tiles per batch"))
        if self.num_workers < 0:
            raise ConfigError(format_error(None, f"data.num_workers must be >= 0 (found {self.num_workers})",
                                           "set data.num_workers to 0 (load in the main process) or a number of processes"))
        if self.prefetch_factor is not None and (self.prefetch_factor < 1 or self.num_workers == 0):
            raise ConfigError(format_error(
                None, f"data.prefetch_factor: {self.prefetch_factor} needs data.num_workers > 0 and a value >= 1 "
                f"(found num_workers {self.num_workers})",
                "set data.num_workers to a number of processes, or data.prefetch_factor: null"))
        check_choice("on_read_error", self.on_read_error, ReadErrorPolicy)
        check_choice("worker_start", self.worker_start, StartMethod)
