"""Prediction over many rasters with one loaded checkpoint; a bad input is reported, not fatal."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geobp.classes import class_names_for
from geobp.errors import CheckpointError, ConfigError, GeobpError, format_error
from geobp.inference.outputs import CLASSES_SUFFIX
from geobp.inference.distributed import Ranks, plan, release_cuda_memory
from geobp.inference.exported import ExportedModel, is_exported, load_exported
from geobp.inference.parts import remove_parts, share_rows, write_from_parts
from geobp.inference.predict import PredictOptions, check_paths, open_job, predict_options, predict_raster, predict_share
from geobp.task import SegmentationTask
from geobp.inference.sinks import OutputLayout, check_outputs_free, output_paths, output_sinks
from geobp.inference.vectorize import VectorOptions, vector_path, vectorize_class_map
from geobp.raster import list_rasters
from geobp.sources.imagery import is_stacked, resolve_images
from geobp.sources.stack import SceneLeftOutWarning, warp_block_for
from geobp.sources.locations import file_stem, is_folder_url, location
from geobp.sources.urls import redact


@dataclass
class InferenceSummary:
    """What :func:`predict_many` did.

    Attributes:
        succeeded: (input, class map written) per raster that finished.
        failed: (input, one-line error message) per raster that did not.
        class_names: the model's classes, one name per class id (what scoring needs for its
            :class:`~geobp.data.labels.LabelOptions`); empty before the checkpoint is loaded.
    """

    succeeded: list[tuple[str | Path, Path]] = field(default_factory=list)
    failed: list[tuple[str | Path, str]] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every input succeeded (the CLI exits 0)."""
        return not self.failed

    @property
    def exit_code(self) -> int:
        """0 when all succeeded, 1 otherwise."""
        return 0 if self.ok else 1

    def lines(self) -> list[str]:
        """Human-readable report: one line per failure, then a count."""
        out = [f"FAILED {msg}" for _, msg in self.failed]
        out.append(f"{len(self.succeeded)} raster(s) predicted, {len(self.failed)} failed")
        return out


def expand_inputs(inputs: list[Any], band_names: Sequence[str] | None = None,
                  tile_size: int = 256) -> tuple[list[str | Path], list[tuple[str | Path, str]]]:
    """Replace folders (and ``s3://`` prefixes) by their ``.tif``/``.tiff`` files (sorted, not recursive).

    URLs become GDAL paths (:func:`geobp.sources.locations.location`); a URL whose last segment
    has no file suffix (``s3://bucket/scenes/``) is listed as a folder. A STAC document or a
    mapping of sources becomes one stacked scene per item or reference file, holding the model's
    bands ``band_names`` (:func:`geobp.sources.imagery.resolve_images`).

    Returns:
        (rasters, problems): a folder holding no rasters (or that cannot be listed) is a problem,
        not an error. Paths that do not exist are kept, so that reading them reports the failure
        with the others.
    """
    rasters: list[str | Path] = []
    problems: list[tuple[str | Path, str]] = []
    plain = []
    for item in inputs:
        if not is_stacked(item):
            plain.append(item)
            continue
        name = "--images" if isinstance(item, Mapping) else redact(str(item))
        error: GeobpError | None = None
        with warnings.catch_warnings(record=True) as caught:  # scenes another source does not cover
            warnings.simplefilter("always", SceneLeftOutWarning)
            try:
                rasters.extend(resolve_images(item, list(band_names) if band_names else None,
                                              warp_block=warp_block_for(tile_size)) or [])
            except GeobpError as err:  # reported after the scenes left out, which it may point to
                error = err
        for w in caught:  # a left-out scene is a failed input; other warnings are shown as they came
            if issubclass(w.category, SceneLeftOutWarning):
                problems.append((name, str(w.message)))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if error is not None:
            problems.append((name, str(error)))
    for item in map(location, plain):
        if isinstance(item, str):  # remote: a file, or a prefix to list
            if not is_folder_url(item):
                rasters.append(item)
                continue
            try:
                rasters.extend(list_rasters(item))
            except GeobpError as err:
                problems.append((item, str(err)))
        elif item.is_dir():
            found = list_rasters(item)
            if not found:
                problems.append(
                    (item, format_error(item, "folder holds no .tif or .tiff files", "pass GeoTIFFs or folders of them"))
                )
            rasters.extend(found)
        else:
            rasters.append(item)
    return rasters, problems


def class_map_path(src: str | Path, out_dir: str | Path) -> Path:
    """Where the class map of ``src`` goes: ``<out_dir>/<stem>_classes.tif``."""
    return Path(out_dir) / f"{file_stem(src)}{CLASSES_SUFFIX}.tif"


def predict_many(
    ckpt_or_task: str | Path | SegmentationTask | ExportedModel,
    inputs: list[str | Path],
    out_dir: str | Path,
    options: PredictOptions | None = None,
    *,
    ranks: Ranks | None = None,
    vector: VectorOptions | None = None,
    **overrides: Any,
) -> InferenceSummary:
    """Predict every input raster with one model, writing ``<out_dir>/<stem>_classes.tif`` each.

    The checkpoint is loaded once; bands, normalization, class names, the input dtype and the
    default tile size come from it (they replace those of ``options``). An input that fails
    (unreadable, wrong bands, existing output ...) is recorded with its one-line message and the
    others still run.

    Args:
        ckpt_or_task: path of a ``geobp fit`` checkpoint, or a loaded :class:`SegmentationTask`;
            or a model exported by ``geobp export`` (``.onnx``, ``.pt``, ``.ts``; its metadata
            gives what the checkpoint would), or a loaded
            :class:`~geobp.inference.exported.ExportedModel`.
        inputs: GeoTIFFs and/or folders of them.
        out_dir: output folder (created if needed).
        options: how to predict (:class:`PredictOptions`; its defaults when None). Its
            ``device`` is also where the checkpoint is loaded; with several processes only
            rank 0 shows progress bars.
        ranks: this process's rank among several (see :mod:`geobp.inference.distributed`);
            by default those of the initialized process group, or a single process. With
            several, each call must get the same arguments; every process returns the same
            summary.
        vector: also write the polygons of each class map, ``<stem>_classes.<ext>`` beside it
            (:func:`~geobp.inference.vectorize.vectorize_class_map`, after the class map is
            complete, by the process that wrote it); their confidence is read from the
            confidence or probabilities output when one is written. A failure fails the raster;
            an existing polygon file (without ``overwrite``) fails it before it is predicted.
        **overrides: fields of :class:`PredictOptions` replacing those of ``options``
            (:func:`~geobp.inference.predict.predict_options`), e.g. ``tile_size=256, device="cuda"``.

    Returns:
        An :class:`InferenceSummary`; its ``exit_code`` is non-zero when any input failed.

    Raises:
        DataNotFoundError, CheckpointError, ExportedModelError: the checkpoint (or exported
            model) cannot be loaded.
        ConfigError: invalid options (an overlap that does not fit the tile size included), or
            two inputs share a file name (their outputs would collide).
    """
    opts = predict_options(options, **overrides)
    task = ckpt_or_task
    if not isinstance(task, (SegmentationTask, ExportedModel)):
        task = (load_exported(task, opts.device) if is_exported(task)
                else SegmentationTask.from_checkpoint(ckpt_or_task, map_location=opts.device))
    pre = task.preprocessing
    if pre is None:
        raise CheckpointError(format_error(ckpt_or_task if not isinstance(ckpt_or_task, SegmentationTask) else None,
                                           "model has no preprocessing (band statistics)", "train with `geobp fit`, which stores them"))
    hp = task.hparams
    k = int(hp["num_classes"])
    ranks = ranks or Ranks.current()
    # the checkpoint's own values, and the tile size and overlap settled, before any raster is listed
    opts = dataclasses.replace(
        opts.for_model(task), num_classes=k, class_names=class_names_for(hp.get("class_names"), k),
        expected_dtype=pre.dtype, band_names=hp.get("in_band_names"), progress=opts.progress and ranks.rank == 0,
    )
    rasters, failed = expand_inputs(inputs, opts.band_names, opts.tile_size or 256)
    summary = InferenceSummary(failed=failed, class_names=list(opts.class_names or []))
    seen: dict[Path, Path] = {}
    for src in rasters:
        dst = class_map_path(src, out_dir)
        if dst in seen:
            raise ConfigError(
                format_error(src, f"same file name as {seen[dst]}: both would write {dst}", "predict them into separate output folders")
            )
        seen[dst] = src
    owners = plan(rasters, ranks.world) if ranks.world > 1 else [0] * len(rasters)
    # (input index, input, error message or None) of the rasters this process reports
    results: list[tuple[int, Path, str | None]] = []
    for n, src in enumerate(rasters):
        dst = class_map_path(src, out_dir)
        reports = ranks.rank == 0 if owners is None else owners[n] == ranks.rank
        taken = _vector_taken(src, dst, opts, vector)  # checked with the other outputs, before predicting
        if taken is not None:
            if reports:
                results.append((n, src, taken))
            continue
        if owners is None:  # fewer rasters than processes: every process predicts a share of each
            error = _predict_split(task, src, dst, ranks, opts)
            if ranks.rank == 0:
                results.append((n, src, error))
        elif owners[n] == ranks.rank:
            results.append((n, src, _predict_whole(task, src, dst, opts)))
        if vector is not None and results and results[-1][0] == n and results[-1][2] is None:
            results[-1] = (n, src, _vectorize(dst, opts, vector))
    if ranks.world > 1:
        results = sorted((r for part in ranks.all_gather(results) for r in part), key=lambda r: r[0])
    for _, src, error in results:
        if error is None:
            summary.succeeded.append((src, class_map_path(src, out_dir)))
        else:
            summary.failed.append((src, error))
    return summary


def _message(src: str | Path, err: Exception) -> str:
    """The one-line report of a failed raster."""
    release_cuda_memory(err)
    return str(err) if isinstance(err, GeobpError) else redact(f"{src}: {type(err).__name__}: {err}")


def _vector_taken(src: str | Path, dst: Path, opts: PredictOptions, vector: VectorOptions | None) -> str | None:
    """The error message if the polygons of class map ``dst`` would replace an existing file without ``overwrite``; else None.

    Every process sees the same output folder, so all of them skip such a raster alike.
    """
    if vector is None:
        return None
    try:
        check_outputs_free([vector_path(dst, vector.format)], opts.overwrite)
    except Exception as err:  # noqa: BLE001 - reported like a failed prediction
        return _message(src, err)
    return None


def _vectorize(dst: Path, opts: PredictOptions, vector: VectorOptions) -> str | None:
    """Write the polygons of class map ``dst``; the error message, or None on success."""
    outputs = output_paths(dst, opts.probabilities)
    try:
        vectorize_class_map(dst, None, dataclasses.replace(vector, overwrite=opts.overwrite),
                            confidence=outputs.get("confidence", outputs.get("probs")))
    except Exception as err:  # noqa: BLE001 - reported like a failed prediction
        return _message(dst, err)
    return None


def _predict_whole(task: SegmentationTask, src: str | Path, dst: Path, opts: PredictOptions) -> str | None:
    """Predict one raster in this process; the error message, or None on success."""
    try:
        predict_raster(task, src, dst, task.preprocessing, opts)
    except Exception as err:  # noqa: BLE001 - one bad raster must not stop the others
        return _message(src, err)
    return None


def _predict_split(task: SegmentationTask, src: str | Path, dst: Path, ranks: Ranks, opts: PredictOptions) -> str | None:
    """Predict this process's share of one raster; rank 0 then writes the outputs from every share.

    Every process takes part in the exchange of errors even when its share failed, so that one
    bad raster cannot leave the others waiting. Returns the error message (on rank 0), or None.
    """
    error, job, shares = None, None, []
    sinks = output_sinks(dst, opts)
    try:
        check_paths(src, sinks, opts.overwrite)
        job = open_job(src, task.preprocessing, opts)
        shares = share_rows(job.grid, ranks.world)
        mine = [s for s in shares if s.rank == ranks.rank]
        if mine:
            predict_share(task, job, mine[0], sinks, opts)
    except Exception as err:  # noqa: BLE001 - reported by rank 0 after the exchange
        error = _message(src, err)
    errors = [e for e in ranks.all_gather(error) if e is not None]
    if ranks.rank != 0:
        return None
    try:
        if errors:
            return errors[0]
        assert job is not None and opts.class_names is not None
        write_from_parts(output_sinks(dst, opts), job.grid, shares, OutputLayout(job.profile, opts.class_names))
    except Exception as err:  # noqa: BLE001
        return _message(src, err)
    finally:
        remove_parts([sink.path for sink in sinks], ranks.world)
    return None
