"""Prediction over many rasters with one loaded checkpoint; a bad input is reported, not fatal."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from geobp.classes import class_names_for
from geobp.errors import CheckpointError, ConfigError, GeobpError, format_error
from geobp.inference.outputs import CLASSES_SUFFIX, Probabilities
from geobp.inference.distributed import Ranks, plan, release_cuda_memory
from geobp.inference.parts import part_path, remove_parts, share_rows, write_from_parts
from geobp.inference.predict import (
    MatchBands, PredictOptions, Precision, Reader, check_paths, open_job, predict_share, predict_with,
)
from geobp.task import SegmentationTask
from geobp.raster import list_rasters
from geobp.tiling import check_tile_args



@dataclass
class InferenceSummary:
    """What :func:`predict_many` did.

    Attributes:
        succeeded: (input, class map written) per raster that finished.
        failed: (input, one-line error message) per raster that did not.
    """

    succeeded: list[tuple[Path, Path]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

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


def expand_inputs(inputs: list[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Replace folders by their ``.tif``/``.tiff`` files (sorted, not recursive).

    Returns:
        (rasters, problems): a folder holding no rasters is a problem, not an error. Paths that
        do not exist are kept, so that reading them reports the failure with the others.
    """
    rasters: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
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
    return Path(out_dir) / f"{Path(src).stem}{CLASSES_SUFFIX}.tif"


def predict_many(
    ckpt_or_task: str | Path | SegmentationTask,
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    precision: Precision | str = "32-true",
    probabilities: Probabilities = "none",
    cog: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int | None = None,
    reader: Reader | None = None,
    ranks: Ranks | None = None,
    match_bands: MatchBands = "names",
) -> InferenceSummary:
    """Predict every input raster with one model, writing ``<out_dir>/<stem>_classes.tif`` each.

    The checkpoint is loaded once; bands, normalization, class names and the default tile size
    come from it. An input that fails (unreadable, wrong bands, existing output ...) is recorded
    with its one-line message and the others still run.

    Args:
        ckpt_or_task: path of a ``geobp fit`` checkpoint, or a loaded :class:`SegmentationTask`.
        inputs: GeoTIFFs and/or folders of them.
        out_dir: output folder (created if needed).
        tile_size: tile size; the checkpoint's training tile size when None (512 if unrecorded).
        overlap: tile overlap; an eighth of the tile size when None (64 for 512).
        batch_size, device, precision, probabilities, cog, overwrite, progress,
        num_workers, reader: as in :func:`predict_raster`.
        ranks: this process's rank among several (see :mod:`geobp.inference.distributed`);
            by default those of the initialized process group, or a single process. With
            several, each call must get the same arguments; every process returns the same
            summary, and only rank 0 shows progress bars.
        match_bands: how the model's bands are found in each raster (see :class:`PredictOptions`);
            the model's band names come from the checkpoint.

    Returns:
        An :class:`InferenceSummary`; its ``exit_code`` is non-zero when any input failed.

    Raises:
        DataNotFoundError, CheckpointError: the checkpoint cannot be loaded.
        ConfigError: invalid tile size or overlap, or two inputs share a file name (their
            outputs would collide).
    """
    task = ckpt_or_task
    if not isinstance(task, SegmentationTask):
        task = SegmentationTask.from_checkpoint(ckpt_or_task, map_location=device)
    pre = task.preprocessing
    if pre is None:
        raise CheckpointError(format_error(ckpt_or_task if not isinstance(ckpt_or_task, SegmentationTask) else None,
                                           "model has no preprocessing (band statistics)", "train with `geobp fit`, which stores them"))
    hp = task.hparams
    k = int(hp["num_classes"])
    names = class_names_for(hp.get("class_names"), k)
    tile = int(tile_size or hp.get("tile_size") or 512)
    overlap = tile // 8 if overlap is None else overlap
    check_tile_args(tile, overlap)  # before any raster is listed (PredictOptions checks it again)
    rasters, failed = expand_inputs(inputs)
    summary = InferenceSummary(failed=failed)
    seen: dict[Path, Path] = {}
    for src in rasters:
        dst = class_map_path(src, out_dir)
        if dst in seen:
            raise ConfigError(
                format_error(src, f"same file name as {seen[dst]}: both would write {dst}", "predict them into separate output folders")
            )
        seen[dst] = src
    ranks = ranks or Ranks.current()
    owners = plan(rasters, ranks.world) if ranks.world > 1 else [0] * len(rasters)
    opts = PredictOptions(
        tile_size=tile, overlap=overlap, batch_size=batch_size, device=device, precision=precision, num_classes=k,
        class_names=names, probabilities=probabilities, cog=cog, overwrite=overwrite,
        progress=progress and ranks.rank == 0, num_workers=num_workers, expected_dtype=pre.dtype,
        band_names=hp.get("in_band_names"), match_bands=match_bands, reader=reader,
    )
    # (input index, input, error message or None) of the rasters this process reports
    results: list[tuple[int, Path, str | None]] = []
    for n, src in enumerate(rasters):
        dst = class_map_path(src, out_dir)
        if owners is None:  # fewer rasters than processes: every process predicts a share of each
            error = _predict_split(task, src, dst, ranks, opts)
            if ranks.rank == 0:
                results.append((n, src, error))
        elif owners[n] == ranks.rank:
            results.append((n, src, _predict_whole(task, src, dst, opts)))
    if ranks.world > 1:
        results = sorted((r for part in ranks.all_gather(results) for r in part), key=lambda r: r[0])
    for _, src, error in results:
        if error is None:
            summary.succeeded.append((src, class_map_path(src, out_dir)))
        else:
            summary.failed.append((src, error))
    return summary


def _message(src: Path, err: Exception) -> str:
    """The one-line report of a failed raster."""
    release_cuda_memory(err)
    return str(err) if isinstance(err, GeobpError) else f"{src}: {type(err).__name__}: {err}"


def _predict_whole(task: SegmentationTask, src: Path, dst: Path, opts: PredictOptions) -> str | None:
    """Predict one raster in this process; the error message, or None on success."""
    try:
        predict_with(task, src, dst, task.preprocessing, opts)
    except Exception as err:  # noqa: BLE001 - one bad raster must not stop the others
        return _message(src, err)
    return None


def _predict_split(task: SegmentationTask, src: Path, dst: Path, ranks: Ranks, opts: PredictOptions) -> str | None:
    """Predict this process's share of one raster; rank 0 then writes the outputs from every share.

    Every process takes part in the exchange of errors even when its share failed, so that one
    bad raster cannot leave the others waiting. Returns the error message (on rank 0), or None.
    """
    error, job, shares = None, None, []
    try:
        check_paths(src, dst, opts.probabilities, opts.overwrite)
        job = open_job(src, task.preprocessing, opts)
        shares = share_rows(job.grid, ranks.world)
        mine = [s for s in shares if s.rank == ranks.rank]
        if mine:
            predict_share(task, job, mine[0], part_path(dst, ranks.rank), opts)
    except Exception as err:  # noqa: BLE001 - reported by rank 0 after the exchange
        error = _message(src, err)
    errors = [e for e in ranks.all_gather(error) if e is not None]
    if ranks.rank != 0:
        return None
    try:
        if errors:
            return errors[0]
        assert job is not None
        write_from_parts(dst, job.grid, shares, job.profile, opts.class_names,
                         probabilities=opts.probabilities, cog=opts.cog, overwrite=opts.overwrite)
    except Exception as err:  # noqa: BLE001
        return _message(src, err)
    finally:
        remove_parts(dst, ranks.world)
    return None
