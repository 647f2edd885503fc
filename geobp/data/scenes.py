"""Scenes on disk: find ``images/<name>.tif`` and ``masks/<name>.tif`` pairs and check they align."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.progress import track

from geobp.bands import band_number, default_band_name
from geobp.data.headers import read_headers
from geobp.data.preprocessing import CACHE_DIR
from geobp.data.validation import SceneReport, check_consistency, check_headers, scan_pixels
from geobp.errors import ConfigError, DataNotFoundError, format_error
from geobp.raster import RasterInfo, list_rasters
from geobp.sources.locations import cache_root, file_stem, join, location


@dataclass(frozen=True)
class Scene:
    """One image and its label mask, on the same grid."""

    name: str
    image: RasterInfo
    mask: RasterInfo | None


def rasters_by_stem(folder: str | Path) -> dict[str, str | Path]:
    """Map stem to path for every GeoTIFF in ``folder`` (see :func:`geobp.raster.list_rasters`)."""
    return {file_stem(p): p for p in list_rasters(folder)}


def scene_paths(root: str | Path) -> dict[str, tuple[str | Path, str | Path | None]]:
    """Pair ``root/images/<name>.tif`` with ``root/masks/<name>.tif`` (None when the mask is missing).

    ``root`` may be an ``s3://`` prefix: its ``images/`` and ``masks/`` are listed like folders.

    Raises:
        DataNotFoundError: ``root/images`` is missing or holds no GeoTIFF.
        ConfigError: a remote root that cannot be listed (HTTP, GCS, Azure).
    """
    root = location(root)
    images_dir, masks_dir = join(root, "images"), join(root, "masks")
    layout_fix = "put images in ROOT/images/<name>.tif and masks in ROOT/masks/<name>.tif (see data/README.md)"
    if isinstance(root, str):  # remote: list the prefixes (a missing one holds no file)
        images = rasters_by_stem(images_dir)
        try:
            masks = rasters_by_stem(masks_dir)
        except DataNotFoundError:
            masks = {}
        return {name: (path, masks.get(name)) for name, path in images.items()}
    if not images_dir.is_dir():
        raise DataNotFoundError(format_error(images_dir, "folder not found", layout_fix))
    images = rasters_by_stem(images_dir)
    if not images:
        raise DataNotFoundError(format_error(images_dir, "no .tif files found", layout_fix))
    masks = rasters_by_stem(masks_dir) if masks_dir.is_dir() else {}
    return {name: (path, masks.get(name)) for name, path in images.items()}


def find_scenes(root: str | Path, require_masks: bool = True, cache_dir: str | Path | None = None) -> list[Scene]:
    """Find the scenes of a dataset folder and run the header checks on them.

    Expected layout: ``root/images/<name>.tif`` (multi-band) and ``root/masks/<name>.tif``
    (single-band class ids), matched by name. Each pair must share CRS, transform and shape;
    all images must have the same band count and dtype. Headers are read in parallel and cached
    in ``<cache_dir or root>/.geobp_cache/headers.json`` (a remote root's in the local
    :func:`~geobp.sources.locations.default_cache_dir`) (:func:`geobp.data.headers.read_headers`).

    Raises:
        DataNotFoundError: the folders are missing or empty, or an image has no mask.
        RasterReadError: a file is not a readable raster.
        RasterMismatchError: an image and its mask are on different grids.
        BandMismatchError: band counts or dtypes differ between scenes, or a mask has several bands.
        GeoreferenceError: a raster lacks a CRS or is not north-up.
    """
    pairs = scene_paths(root)
    files = [p for pair in pairs.values() for p in pair if p is not None]
    headers = read_headers(files, cache_root(files, cache_dir, fallback=root) / CACHE_DIR)
    reports = [check_headers(name, img, msk, require_masks, headers) for name, (img, msk) in pairs.items()]
    check_consistency(reports)
    for report in reports:
        for problem in report.problems:
            if problem.severity == "fatal" and problem.error is not None:
                raise problem.error
    return [Scene(r.name, r.image, r.mask) for r in reports]  # type: ignore[arg-type]


def check_dataset(
    root: str | Path,
    num_classes: int | None = None,
    ignore_index: int = 255,
    nodata: float | None = None,
    full: bool = True,
    progress: bool = False,
    workers: int = 1,
) -> list[SceneReport]:
    """Check every scene of a dataset folder (all problems, not only the first) and report per scene.

    Args:
        root: dataset folder.
        num_classes: when given, mask values must be below it (or the ignore index).
        ignore_index: label of unlabelled pixels.
        nodata: nodata value; the files' tags when None.
        full: also read every block of every file (slower; finds corrupt blocks and bad labels).
        workers: processes reading the files in parallel (each scene is read by one).
        progress: show a progress bar.

    Raises:
        DataNotFoundError: ``root/images`` is missing or holds no GeoTIFF.
    """
    pairs = scene_paths(root)
    headers = read_headers([p for pair in pairs.values() for p in pair if p is not None])  # fresh: no cache
    reports = [check_headers(name, img, msk, headers=headers) for name, (img, msk) in pairs.items()]
    check_consistency(reports)
    if full:
        todo = [n for n, r in enumerate(reports) if not r.fatal]
        args = [(reports[n], num_classes, ignore_index, nodata) for n in todo]
        if workers > 1 and len(todo) > 1:
            from concurrent.futures import ProcessPoolExecutor

            from geobp.processes import environment_initializer, start_context

            # not forked: this process already runs threads (the header pool, GDAL's, torch's)
            with ProcessPoolExecutor(max_workers=workers, mp_context=start_context(preload=(__name__,)),
                                     initializer=environment_initializer()) as pool:
                scanned = list(track(pool.map(_scan, args), total=len(args), description="Reading scenes",
                                     disable=not progress, transient=True))
        else:
            scanned = [_scan(a) for a in track(args, description="Reading scenes", disable=not progress, transient=True)]
        for n, report in zip(todo, scanned):
            reports[n] = report
    return reports


def _scan(args: tuple[SceneReport, int | None, int, float | None]) -> SceneReport:
    """:func:`scan_pixels` of one report, returned (it runs in a worker process with ``workers > 1``)."""
    report, num_classes, ignore_index, nodata = args
    scan_pixels(report, num_classes, ignore_index, nodata)
    return report


def resolve_bands(bands: list[int | str] | None, count: int, source: str,
                  names: Sequence[str | None] | None = None) -> list[int]:
    """Turn a band selection (1-based indices, as in GDAL, or band names) into a checked list of
    indices; None selects all bands.

    Args:
        bands: ``data.bands``.
        count: the files' band count.
        source: the file the selection applies to (for messages).
        names: the files' band names (``data.band_names`` or the band descriptions), which names
            in ``bands`` are looked up in (case-insensitively); ``band_<i>`` always names band i.

    Raises:
        ConfigError: an index is out of range or repeated, or a name matches no band.
    """
    if bands is None:
        return list(range(1, count + 1))
    if any(isinstance(b, str) for b in bands):
        known = [(n or default_band_name(i)) for i, n in enumerate(list(names or ()) + [None] * (count - len(names or ())),
                                                                   start=1)]
        picked: list[int] = []
        for b in bands:
            number = band_number(b, known, count)
            if number is None:
                raise ConfigError(format_error(source, f"data.bands names band {b!r}, which the files do not have "
                                               f"(their bands: {', '.join(known)})",
                                               "use one of those names or a 1-based index, or set data.band_names"))
            picked.append(number)
        bands = picked
    bad = [b for b in bands if not 1 <= b <= count]
    if bad or len(set(bands)) != len(bands) or not bands:
        raise ConfigError(
            format_error(
                source,
                f"band selection {bands} is invalid for a raster with {count} bands "
                f"(expected distinct 1-based indices in 1..{count})",
                "fix data.bands in the config, or set it to null to use all bands",
            )
        )
    return list(bands)
