"""Streaming sliding-window prediction over one raster, for any ``nn.Module``.

Three stages overlap: readers read and preprocess batches of tiles (threads,
:class:`~geobp.inference.reader.PrefetchReader`, or processes,
:class:`~geobp.inference.procreader.ProcessReader`: ``PredictOptions.reader``), the calling
thread runs the model, and a writer thread blends the tiles and hands the finished strips to
the outputs (:class:`~geobp.inference.blend.TileBlender`,
:class:`~geobp.inference.writer.BlendWriter`, the sinks of :mod:`geobp.inference.sinks`).
Peak memory is bounded by the tile size, the batch size, the overlap band of one tile row
and GDAL's block cache (sized by :func:`~geobp.inference.blockcache.block_cache_bytes` from
the raster's width and blocks), not by the raster's height.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from geobp.inference.blend import TileBlender
from geobp.inference.blockcache import block_cache_bytes
from geobp.inference.parts import PartSink, RowShare
from geobp.inference.procreader import ProcessReader
from geobp.inference.reader import PrefetchReader, raw_dtype
from geobp.inference.sinks import OutputLayout, OutputSink, check_outputs_free, output_sinks
from geobp.inference.threads import decode_threads, default_processes, default_workers
from geobp.inference.tta import tta_forward
from geobp.inference.writer import BlendWriter
from geobp.raster import check_georeferenced, describe, open_raster
from geobp.sources.locations import file_name, location
from geobp.tiling import Tile, TileGrid
from geobp.choices import PRECISION_ALIASES, MatchBands, NormalizeOn, Precision, Reader  # noqa: F401 - re-exported
from geobp.inference.options import (  # noqa: F401 - re-exported: predict is where users look for them
    DEFAULT_TILE_SIZE,
    PredictOptions,
    normalize_precision,
    predict_options,
    training_tile_size,
)

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def reader_kind(reader: Reader | None, device: str | torch.device) -> Reader:
    """The reader to use: ``reader``, or by default processes on a GPU and threads on the CPU."""
    if reader is not None:
        return reader
    return "processes" if torch.device(device).type == "cuda" else "threads"


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
    *,
    extra_sinks: Sequence[OutputSink] = (),
    **overrides: Any,
) -> Path:
    """Predict a class map for one raster with sliding, overlapping, smoothly blended tiles.

    The model gets float32 [B, C, tile, tile] normalised tiles and must return logits
    [B, K, tile, tile]; softmax probabilities of overlapping tiles are averaged with smooth
    weights (:func:`geobp.tiling.axis_blend_weights`) that sum to 1 at every pixel, so a
    translation-equivariant model gives the same result whatever the tile size. The model is
    moved to ``device`` and put in eval mode. The outputs (:mod:`geobp.inference.sinks`) are
    written under temporary names and renamed only when complete.

    Args:
        model: any module mapping tiles to logits (e.g. a loaded ``SegmentationTask``).
        src: input GeoTIFF.
        dst: class map to write (``<stem>_classes.tif`` by convention).
        preprocessing: band selection, nodata and normalization used in training. The input
            file's own nodata tag, when it has one, takes precedence for masking.
        options: how to predict (:class:`PredictOptions`; its defaults when None).
        extra_sinks: outputs written besides those of ``options`` (the class map and the
            probabilities or confidence), e.g. a format of one's own
            (:class:`~geobp.inference.sinks.OutputSink`).
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
    src, dst = location(src), Path(dst)
    sinks = [*output_sinks(dst, opts), *extra_sinks]
    check_paths(src, sinks, opts.overwrite)
    job = open_job(src, preprocessing, opts)
    _run(model, job, sinks, (0, len(job.grid.row_offsets)), opts)
    return dst


def check_paths(src: str | Path, sinks: Sequence[OutputSink], overwrite: bool) -> None:
    """Check the outputs' paths before any work.

    Raises:
        ConfigError: an output would replace the input.
        OutputExistsError: an output exists and ``overwrite`` is False.
    """
    paths = [sink.path for sink in sinks]
    if isinstance(src, Path) and src.resolve() in {p.resolve() for p in paths}:
        raise ConfigError(format_error(src, "output would overwrite the input", "write to another folder or name"))
    check_outputs_free(paths, overwrite)


@dataclasses.dataclass(frozen=True)
class Job:
    """A checked input raster and its tile grid.

    Attributes:
        src: the input.
        profile: its rasterio profile (the outputs take its grid).
        preprocessing: the training preprocessing, with the file's own nodata when it has one.
        grid: the sliding-window tiles.
    """

    src: str | Path
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
    src = location(src)
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


def predict_share(model: nn.Module, job: Job, share: RowShare, sinks: Sequence[OutputSink], opts: PredictOptions) -> list[Path]:
    """Predict one process's share of a raster's tile rows into a part file per output (see
    :mod:`geobp.inference.parts`); ``sinks`` are the outputs (they are not opened here).

    ``opts`` as for the whole raster; ``batch_size`` must be the same for every share (the
    shares run the single-process batches). On failure no part file is left.

    Returns:
        The part files, one per sink.
    """
    parts = [PartSink(sink, job.grid, share) for sink in sinks]
    _run(model, job, parts, (share.warmup, share.stop), opts)
    return [part.path for part in parts]


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


def _run(model: nn.Module, job: Job, sinks: Sequence[OutputSink], rows: tuple[int, int], opts: PredictOptions) -> None:
    """Predict the tiles of tile rows ``rows`` and write the finished strips to ``sinks``: committed
    when every row is written, aborted on any error."""
    device, precision, nodata_value = opts.device, opts.precision, opts.nodata_value
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
    bar, task_id = _progress(opts.progress, file_name(job.src), sum(map(len, batches)))

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
                    # with opts.tta, the log of the class probabilities averaged over flipped and turned
                    # copies of the batch: the softmax below gives back that average (geobp.inference.tta)
                    logits = tta_forward(model, image, opts.tta)
                    del image
                    if writer is None:
                        k = _check_output(logits, len(batch.tiles), tile_size, num_classes, class_names)
                        if nodata_value < k:
                            raise ConfigError(
                                format_error(None, f"nodata value {nodata_value} is a class id ({k} classes)", "pick a larger nodata value")
                            )
                        layout = OutputLayout(job.profile, class_names_for(class_names, k))
                        blender = TileBlender(grid, [(sink.encode, sink.bands(layout)) for sink in sinks], first, stop)
                        writer = BlendWriter(blender, sinks, layout)
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
                    if dev.type == "cpu":  # blend with numpy on the CPU
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
