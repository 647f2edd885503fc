"""Streaming sliding-window prediction over one raster, for any ``nn.Module``.

Three stages overlap: readers read and preprocess batches of tiles (threads,
:class:`~geobp.inference.reader.PrefetchReader`, or processes,
:class:`~geobp.inference.procreader.ProcessReader`: ``PredictOptions.reader``), the calling
thread runs the model, and a
writer thread blends the tiles and writes finished strips
(:class:`~geobp.inference.blend.TileBlender`, :class:`~geobp.inference.outputs.StripWriter`).
Peak memory is bounded by the tile size, the batch size, the overlap band of one tile row
and GDAL's block cache (sized by :func:`~geobp.inference.blockcache.block_cache_bytes` from
the raster's width and blocks), not by the raster's height.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from geobp.bands import bands_by_name
from geobp.classes import class_names_for
from geobp.data.preprocessing import Preprocessing
from geobp.errors import BandMismatchError, ConfigError, SharedMemoryError, format_error
from geobp.inference.blend import Encoder, TileBlender
from geobp.inference.blockcache import block_cache_bytes
from geobp.inference.outputs import (
    OutputFiles,
    Probabilities,
    atomic_output,
    check_outputs_free,
    output_bands,
    output_paths,
)
from geobp.inference.parts import PartSink, RowShare
from geobp.inference.procreader import ProcessReader
from geobp.inference.reader import PrefetchReader, raw_dtype
from geobp.inference.threads import decode_threads, default_processes, default_workers
from geobp.tiling import Tile, TileGrid
from geobp.inference.writer import BlendWriter
from geobp.raster import check_georeferenced, describe, open_raster
from geobp.tiling import check_tile_args
from geobp.inference.choices import (  # noqa: F401 - PRECISION_ALIASES and normalize_precision: re-exported
    PRECISION_ALIASES,
    MatchBands,
    NormalizeOn,
    Precision,
    Reader,
    check_choice,
    normalize_precision,
)

#: The tile size of a model that records no training tile size (``hparams["tile_size"]``).
DEFAULT_TILE_SIZE = 512

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def reader_kind(reader: Reader | None, device: str | torch.device) -> Reader:
    """The reader to use: ``reader``, or by default processes on a GPU and threads on the CPU."""
    if reader is not None:
        return reader
    return "processes" if torch.device(device).type == "cuda" else "threads"


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
        probabilities: ``none``, ``probs`` (per-class uint8 probabilities) or ``confidence``: the
            output written beside the class map (a sink of :data:`geobp.inference.sinks.SINKS`).
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
            (:func:`reader_kind`; BENCHMARKS.md holds the measurements behind it).
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

    def __post_init__(self) -> None:
        if self.tile_size is not None:
            check_tile_args(self.tile_size, self.overlap or 0)
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


def _check_input(src: rasterio.DatasetReader, preprocessing: Preprocessing, expected_dtype: str | None) -> None:
    # the output takes the input's grid: refuse rasters without a CRS or not north-up, as fit does
    check_georeferenced(describe(src))
    need = max(preprocessing.bands)
    if src.count < need:
        raise BandMismatchError(
            format_error(
                src.name,
                f"raster has too few bands for the model (expected at least {need}: it reads bands "
                f"{preprocessing.bands}; found {src.count})",
                "pass a raster with the training bands, in the training order",
            )
        )
    if expected_dtype is not None and src.dtypes[0] != expected_dtype:
        raise BandMismatchError(
            format_error(
                src.name,
                f"raster data type differs from training (expected {expected_dtype}, found {src.dtypes[0]})",
                f"convert it first, e.g. `gdal_translate -ot {expected_dtype.capitalize()} IN OUT`, keeping the training scaling",
            )
        )


def _check_output(logits: torch.Tensor, batch: int, tile: int, num_classes: int | None, class_names: list[str] | None) -> int:
    shape = tuple(logits.shape)
    if logits.ndim != 4 or shape[0] != batch or shape[2:] != (tile, tile):
        raise ConfigError(
            format_error(
                None,
                f"model output has shape {list(shape)} for input tiles [{batch}, C, {tile}, {tile}] "
                f"(expected [{batch}, classes, {tile}, {tile}])",
                "use a model whose logits have the input's size, or a tile size it accepts (e.g. a multiple of 32)",
            )
        )
    k = shape[1]
    if num_classes is not None and k != num_classes:
        raise ConfigError(
            format_error(None, f"model predicts {k} classes (expected num_classes={num_classes})", "pass the matching num_classes")
        )
    if class_names is not None and len(class_names) != k:
        raise ConfigError(
            format_error(None, f"{len(class_names)} class names for {k} classes", "pass one name per class")
        )
    return k


def make_encoder(probabilities: Probabilities, nodata_value: int) -> Encoder:
    """The cell encoder for :class:`TileBlender`: class ids, then uint8 probabilities or confidence.

    Works on numpy arrays and on torch tensors (on any device), returning the same kind.
    """

    def encode_numpy(probs: np.ndarray, valid: np.ndarray) -> np.ndarray:
        out = np.empty((output_bands(probabilities, probs.shape[0]), *probs.shape[1:]), np.uint8)
        out[0] = probs.argmax(axis=0)
        invalid = ~valid
        out[0][invalid] = nodata_value
        if probabilities == "probs":
            out[1:] = np.clip(np.rint(probs * 255.0), 0, 255)
            out[1:, invalid] = 0
        elif probabilities == "confidence":
            out[1] = np.clip(np.rint(probs.max(axis=0) * 255.0), 0, 255)
            out[1][invalid] = 0
        return out

    def encode_torch(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        invalid = ~valid
        bands = [probs.argmax(dim=0).to(torch.uint8).masked_fill_(invalid, nodata_value)[None]]
        if probabilities == "probs":
            bands.append((probs * 255.0).round_().clamp_(0, 255).to(torch.uint8).masked_fill_(invalid, 0))
        elif probabilities == "confidence":
            conf = (probs.amax(dim=0) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
            bands.append(conf.masked_fill_(invalid, 0)[None])
        return torch.cat(bands) if len(bands) > 1 else bands[0]

    def encode(probs: Any, valid: Any) -> Any:
        return encode_torch(probs, valid) if isinstance(probs, torch.Tensor) else encode_numpy(probs, valid)

    return encode


def _progress(enabled: bool, name: str, total: int) -> tuple[Any, Any]:
    if not enabled:
        return contextlib.nullcontext(), None
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tiles"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
    )
    return bar, bar.add_task(name, total=total)


def predict_raster(
    model: nn.Module,
    src: str | Path,
    dst: str | Path,
    preprocessing: Preprocessing,
    options: PredictOptions | None = None,
    **overrides: Any,
) -> Path:
    """Predict a class map for one raster with sliding, overlapping, smoothly blended tiles.

    The model gets float32 [B, C, tile, tile] normalised tiles and must return logits
    [B, K, tile, tile]; softmax probabilities of overlapping tiles are averaged with smooth
    weights (:func:`geobp.tiling.axis_blend_weights`) that sum to 1 at every pixel, so a
    translation-equivariant model gives the same result whatever the tile size. The model is
    moved to ``device`` and put in eval mode. Outputs are described in
    :mod:`geobp.inference.outputs`; they are written under temporary names and renamed only
    when complete.

    Args:
        model: any module mapping tiles to logits (e.g. a loaded ``SegmentationTask``).
        src: input GeoTIFF.
        dst: class map to write (``<stem>_classes.tif`` by convention).
        preprocessing: band selection, nodata and normalization used in training. The input
            file's own nodata tag, when it has one, takes precedence for masking.
        options: how to predict (:class:`PredictOptions`; its defaults when None).
        **overrides: fields of :class:`PredictOptions` replacing those of ``options``
            (:func:`predict_options`), e.g. ``tile_size=256, probabilities="probs"``.

    Returns:
        ``dst``.

    Raises:
        DataNotFoundError, RasterReadError: the input cannot be opened or read.
        BandMismatchError: too few bands, or a dtype other than ``expected_dtype``.
        OutputExistsError: an output exists and ``overwrite`` is False.
        ConfigError: invalid options, or model output that does not fit them.
    """
    opts = predict_options(options, **overrides).for_model(model)
    src, dst = Path(src), Path(dst)
    paths = check_paths(src, dst, opts.probabilities, opts.overwrite)
    job = open_job(src, preprocessing, opts)
    with contextlib.ExitStack() as stack:
        tmps = {key: stack.enter_context(atomic_output(path, opts.cog)) for key, path in paths.items()}

        def open_sink(names: list[str]) -> OutputFiles:
            return OutputFiles(tmps, job.profile, names, opts.probabilities, opts.nodata_value)

        _run(model, job, open_sink, (0, len(job.grid.row_offsets)), opts)
    return dst


def check_paths(src: Path, dst: Path, probabilities: Probabilities, overwrite: bool) -> dict[str, Path]:
    """The output paths of ``dst`` (see :func:`output_paths`), checked before any work.

    Raises:
        ConfigError: an output would replace the input.
        OutputExistsError: an output exists and ``overwrite`` is False.
    """
    paths = output_paths(dst, probabilities)
    if src.resolve() in {p.resolve() for p in paths.values()}:
        raise ConfigError(format_error(src, "output would overwrite the input", "write to another folder or name"))
    check_outputs_free(paths, overwrite)
    return paths


@dataclasses.dataclass(frozen=True)
class Job:
    """A checked input raster and its tile grid.

    Attributes:
        src: the input.
        profile: its rasterio profile (the outputs take its grid).
        preprocessing: the training preprocessing, with the file's own nodata when it has one.
        grid: the sliding-window tiles.
    """

    src: Path
    profile: dict[str, Any]
    preprocessing: Preprocessing
    grid: TileGrid


def open_job(src: str | Path, preprocessing: Preprocessing, opts: PredictOptions) -> Job:
    """Check an input raster against the model's preprocessing and lay out its tiles.

    ``opts`` has its tile size and overlap settled (:meth:`PredictOptions.for_model`).

    Raises:
        DataNotFoundError, RasterReadError, GeoreferenceError, BandMismatchError, ConfigError:
            as :func:`predict_raster`.
    """
    src = Path(src)
    with open_raster(src) as ds:
        _check_input(ds, preprocessing, opts.expected_dtype)
        if opts.match_bands == "names":
            read = bands_by_name(src, ds.descriptions, preprocessing.bands, opts.band_names)
            if read != list(preprocessing.bands):
                preprocessing = dataclasses.replace(preprocessing, bands=read)
        profile = ds.profile
        height, width, file_nodata = ds.height, ds.width, ds.nodata
    if file_nodata is not None:
        preprocessing = dataclasses.replace(preprocessing, nodata=file_nodata)
    assert opts.tile_size is not None and opts.overlap is not None, "open_job takes options settled by for_model"
    return Job(src, profile, preprocessing, TileGrid.build(height, width, opts.tile_size, opts.overlap))


def predict_share(model: nn.Module, job: Job, share: RowShare, part: str | Path, opts: PredictOptions) -> Path:
    """Predict one process's share of a raster's tile rows into a part file (see :mod:`geobp.inference.parts`).

    ``opts`` as for the whole raster; ``batch_size`` must be the same for every share (the
    shares run the single-process batches). On failure the part file is removed.

    Returns:
        ``part``.
    """
    part = Path(part)

    def open_sink(names: list[str]) -> PartSink:
        return PartSink(part, job.grid, share, output_bands(opts.probabilities, len(names)))

    try:
        _run(model, job, open_sink, (share.warmup, share.stop), opts)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return part


def normalized_on(opts: PredictOptions, dtype: str) -> NormalizeOn:
    """Where the tiles of an input of numpy ``dtype`` are normalised (:attr:`PredictOptions.normalize_on`;
    by default on the device for CUDA, and in the reader for dtypes torch cannot carry)."""
    where = opts.normalize_on or ("device" if torch.device(opts.device).type == "cuda" else "reader")
    if where == "device":
        try:
            raw_dtype(dtype)
        except TypeError:
            return "reader"
    return where


def _open_reader(job: Job, batches: list[list[Tile]], opts: PredictOptions) -> PrefetchReader | ProcessReader:
    """The input's reader (``opts.reader``): processes, or threads, also when processes were only
    the default and shared memory is too small for them (a warning says so)."""
    dev = torch.device(opts.device)
    raw = raw_dtype(job.profile["dtype"]) if normalized_on(opts, job.profile["dtype"]) == "device" else None
    # processes decode on one core each (there are as many as cores to spare); threads share
    # the cores left with GDAL decoding threads (see geobp.inference.threads)
    if reader_kind(opts.reader, dev) == "processes":
        try:
            return ProcessReader(job.src, job.grid, batches, job.preprocessing, pin_memory=dev.type == "cuda",
                                 num_workers=opts.num_workers or default_processes(dev), profile=job.profile, raw=raw)
        except SharedMemoryError as err:
            if opts.reader is not None:
                raise
            warnings.warn(f"{err} Reading with threads instead.", RuntimeWarning, stacklevel=2)
    num_workers = opts.num_workers or default_workers(dev)
    return PrefetchReader(job.src, job.grid, batches, job.preprocessing, num_workers=num_workers,
                          pin_memory=dev.type == "cuda", decode_threads=decode_threads(dev, num_workers), raw=raw)


def _run(
    model: nn.Module, job: Job, open_sink: Callable[[list[str]], Any], rows: tuple[int, int], opts: PredictOptions
) -> None:
    """Predict the tiles of tile rows ``rows`` and hand the finished strips to ``open_sink(class names)``."""
    device, precision, probabilities, nodata_value = opts.device, opts.precision, opts.probabilities, opts.nodata_value
    num_classes, class_names = opts.num_classes, opts.class_names
    grid = job.grid
    th, tw, tile_size = grid.tile_h, grid.tile_w, grid.tile
    first, stop = rows
    dev = torch.device(device)
    model = model.to(dev).eval()
    row_w = torch.from_numpy(grid.row_weights).to(dev)
    col_w = torch.from_numpy(grid.col_weights).to(dev)
    autocast = torch.autocast(dev.type, dtype=_AUTOCAST.get(precision, torch.float32), enabled=precision != "32-true")
    # the single-process batches, also for a share: every tile's logits come from the same forward pass
    batches = [b for b in grid.batches(opts.batch_size) if any(first <= i < stop for i, _ in b)]
    bar, task_id = _progress(opts.progress, job.src.name, sum(map(len, batches)))

    with contextlib.ExitStack() as stack:
        # sized so that a tile row finds the blocks it shares with the one before (reader threads share it)
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=block_cache_bytes(job.profile, grid.tile_h)))
        reader = stack.enter_context(_open_reader(job, batches, opts))
        stack.enter_context(bar)
        writer: BlendWriter | None = None
        try:
            with torch.inference_mode(), autocast:
                for batch in reader:
                    image, valid = batch.on_device(dev, job.preprocessing, th, tw)
                    logits = model(image)
                    del image
                    if writer is None:
                        k = _check_output(logits, len(batch.tiles), tile_size, num_classes, class_names)
                        if nodata_value < k:
                            raise ConfigError(
                                format_error(None, f"nodata value {nodata_value} is a class id ({k} classes)", "pick a larger nodata value")
                            )
                        names = class_names_for(class_names, k)
                        blender = TileBlender(grid, make_encoder(probabilities, nodata_value), output_bands(probabilities, k),
                                              first, stop)
                        writer = BlendWriter(blender, lambda names=names: open_sink(names))
                    # softmax in place on the model's output: one [B, K, tile, tile] buffer per batch
                    probs = logits.float()
                    probs = probs.sub_(probs.amax(dim=1, keepdim=True)).exp_()
                    probs = probs.div_(probs.sum(dim=1, keepdim=True))[:, :, :th, :tw]
                    del logits
                    keep = [n for n, (i, _) in enumerate(batch.tiles) if first <= i < stop]
                    tiles = [batch.tiles[n] for n in keep]
                    for n in keep:  # python indices: no host-device sync
                        i, j = batch.tiles[n]
                        probs[n].mul_(row_w[i][:, None]).mul_(col_w[j])
                    if len(keep) < len(batch.tiles):  # a share's first or last batch holds other shares' tiles
                        probs, valid = probs[keep], valid[keep]
                    if dev.type == "cpu":  # numpy blending on the CPU (the faster there: BENCHMARKS.md)
                        writer.put((tiles, probs.numpy(), valid.numpy()))
                    else:  # blend on the device; only uint8 strips come back
                        writer.put((tiles, probs, valid.to(dev, non_blocking=True)))
                    if task_id is not None:
                        bar.advance(task_id, len(batch.tiles))
            if writer is None:
                raise RuntimeError("no tiles were predicted")
            writer.finish()
        except BaseException:
            if writer is not None:
                writer.cancel()
            raise
