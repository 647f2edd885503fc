"""Label alignment: the label sources of :mod:`geobp.data.labels` onto each image's grid, once, into the cache.

:class:`Alignment` produces one image's labels strip by strip (bounded memory whatever the
scene's size), reading only the part of each label source over the strip. :func:`aligned_labels`
writes them atomically to ``<cache root>/.geobp_cache/labels/<stem>.<key>.tif`` (uint8, tiled
like the image, deflate) beside a JSON :class:`~geobp.data.labels.LabelReport`; the key covers
the image's and the labels' paths, sizes and modification times and the options, so a changed
label file is noticed and rebuilt. :func:`find_labelled_scenes` gives the data module its
scenes, :func:`check_labelled_dataset` gives ``geobp check`` its reports.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.warp import reproject
from rasterio.windows import Window, from_bounds

from geobp.atomic import atomic_path
from geobp.data.labels import (
    LabelOptions,
    LabelReport,
    LabelSources,
    VectorInfo,
    numeric_first,
    same_lattice,
    covering_sources,
    expand_paths,
    find_label_sources,
    map_values,
    raster_bounds,
    unmapped_error,
)
from geobp.data.preprocessing import CACHE_DIR
from geobp.data.ranks import computed_once, local_rank, local_world_size
from geobp.data.scenes import Scene
from geobp.data.validation import Problem, SceneReport, check_consistency, check_headers, scan_pixels
from geobp.errors import ConfigError, DataNotFoundError, GeobpError, format_error
from geobp.raster import RASTER_SUFFIXES, RasterInfo, derive_profile, open_raster, project_bounds, read_info
from geobp.sources.locations import cache_root as cache_root_for
from geobp.sources.locations import file_stamp, file_stem
from geobp.sources.urls import redact

#: Bumped when the aligned rasters' content or the report changes meaning.
LABEL_CACHE_VERSION = 1
#: A label finer than this fraction of the image's pixel size is resampled with the mode.
MODE_RATIO = 0.5


# ----- alignment ----------------------------------------------------------------------------


def _align_raster(image: RasterInfo, label: RasterInfo, options: LabelOptions,
                  method: str | None = None) -> tuple[np.ndarray, list[str], str]:
    """One label raster on the image grid (ignore index where it does not reach); its unmapped values and
    method (``method``: the one found for another strip of the same image and label, or None to find it)."""
    ignore = options.ignore_index
    out = np.full(image.shape, ignore, np.uint8)
    with open_raster(label.path) as src:
        offset = same_lattice(image, label)
        if offset is not None:  # the same pixel lattice (within tolerance): a window copy, no warp
            row, col = offset
            r0, c0 = max(row, 0), max(col, 0)
            r1, c1 = min(row + image.height, label.height), min(col + image.width, label.width)
            if r1 <= r0 or c1 <= c0:
                return out, [], "copy"
            raw = src.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
            mapped, unmapped = map_values(raw, label.nodata, options)
            out[r0 - row : r1 - row, c0 - col : c1 - col] = mapped
            return out, unmapped, "copy"
        # only the part of the label that covers the image (plus a margin for the resampling kernel)
        l, b, r, t = project_bounds(image.crs, src.crs, *raster_bounds(image))
        win = from_bounds(l, b, r, t, src.transform)
        c0, r0 = max(math.floor(win.col_off) - 2, 0), max(math.floor(win.row_off) - 2, 0)
        c1 = min(math.ceil(win.col_off + win.width) + 2, src.width)
        r1 = min(math.ceil(win.row_off + win.height) + 2, src.height)
        if r1 <= r0 or c1 <= c0:
            return out, [], "nearest"
        window = Window(c0, r0, c1 - c0, r1 - r0)
        mapped, unmapped = map_values(src.read(1, window=window), label.nodata, options)
        if method is None:  # the label's pixel size measured in the image's CRS: a much finer label takes the mode
            wl, _, wr, _ = project_bounds(src.crs, image.crs, *src.window_bounds(window))
            lw = (wr - wl) / window.width
            method = "mode" if lw < MODE_RATIO * image.transform[0] else "nearest"
        reproject(
            mapped,
            out,
            src_transform=src.window_transform(window),
            src_crs=src.crs,
            src_nodata=ignore,
            dst_transform=rasterio.Affine(*image.transform),
            dst_crs=CRS.from_user_input(image.crs),
            dst_nodata=ignore,
            resampling=Resampling.mode if method == "mode" else Resampling.nearest,
        )
    return out, unmapped, method


def _read_features(image: RasterInfo, vector: VectorInfo, options: LabelOptions) -> tuple[list[Any], list[int], list[str]]:
    """Features over the image, reprojected to its CRS: (geometries, class values, unmapped raw values)."""
    import pyogrio

    bbox = project_bounds(image.crs, vector.crs, *raster_bounds(image))
    columns = [options.label_field] if options.label_field else []
    frame = pyogrio.read_dataframe(vector.path, bbox=bbox, columns=columns)
    frame = frame[frame.geometry.notna() & ~frame.geometry.is_empty]
    if frame.empty:
        return [], [], []
    frame = frame.to_crs(image.crs)
    unmapped: set[str] = set()
    values = [1] * len(frame)
    if options.label_field is not None:
        for i, raw in enumerate(frame[options.label_field].tolist()):
            v = None if raw is None or (isinstance(raw, float) and math.isnan(raw)) else options.lookup(raw)
            if v is None:
                unmapped.add(str(raw))
            values[i] = options.ignore_index if v is None else v
    return list(frame.geometry), values, sorted(unmapped)


#: Image pixels aligned at a time (bounds the memory of one image's alignment, whatever its size: a
#: few uint8 arrays of this size). Each strip costs a label window read, PROJ set-up and a warp, so a
#: scene of up to this many pixels is aligned in one strip.
ALIGN_STRIP_PIXELS = 2**24


def strip_rows(width: int, block_height: int) -> int:
    """Rows per alignment strip: whole blocks of ``block_height`` rows, about :data:`ALIGN_STRIP_PIXELS` pixels."""
    return max(ALIGN_STRIP_PIXELS // max(width, 1) // block_height, 1) * block_height


class Alignment:
    """The labels of one image on its grid, produced strip by strip, and what they hold (the report).

    Label rasters are reprojected with nearest neighbour (the mode when a label pixel is under
    half an image pixel); one on the image's own pixel lattice is copied, without a warp. Several
    rasters form a mosaic: where they overlap, the first (in sorted order) wins. A vector file's
    features are reprojected to the image's CRS and rasterized (later features on top). Pixels no
    label covers get the ignore index.

    Args:
        image: the image's header.
        sources: all label sources of the dataset; those not overlapping the image are skipped.
        options: value mapping and rasterization options.
    """

    def __init__(self, image: RasterInfo, sources: LabelSources, options: LabelOptions) -> None:
        self.image, self.options = image, options
        self.covering = covering_sources(image, sources)
        self._hist = np.zeros(256, np.int64)
        self._unmapped: set[str] = set()
        self._used: dict[str, str] = {}  # label path -> method, in the order they first contributed
        self._features: tuple[list[Any], list[int]] | None = None
        if sources.vector is not None:
            geoms: list[Any] = []
            if self.covering.vector is not None:
                geoms, values, bad = _read_features(image, self.covering.vector, options)
                self._unmapped.update(bad)
                self._features = (geoms, values)
            if not geoms:
                warnings.warn(
                    format_error(
                        sources.vector.path,
                        f"no feature over image {image.path}: all its pixels are ignored",
                        "check that the vector file and the image cover the same area (CRS, extent)",
                    ),
                    stacklevel=3,
                )
                self._features = None

    def strips(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, uint8 labels [rows, W]) from top to bottom; the report gathers as they go."""
        image, options, ignore = self.image, self.options, self.options.ignore_index
        step = rows or strip_rows(image.width, 1)
        a, b, c, d, e, f = image.transform
        for row in range(0, image.height, step):
            part = replace(image, height=min(step, image.height - row), transform=(a, b, c, d, e, f + e * row))
            out = np.full(part.shape, ignore, np.uint8)
            if self._features is not None:
                out[:] = options.background
                geoms, values = self._features
                rasterize(zip(geoms, values), out=out, transform=rasterio.Affine(*part.transform),
                          all_touched=options.all_touched, dtype=np.uint8)
                self._used.setdefault(self.covering.paths[0], "rasterize")
            for label in covering_sources(part, self.covering).rasters:
                aligned, bad, method = _align_raster(part, label, options, self._used.get(label.path))
                self._unmapped.update(bad)
                fill = (out == ignore) & (aligned != ignore)
                if fill.any() or bad:
                    out[fill] = aligned[fill]
                    self._used.setdefault(label.path, method)
            self._hist += np.bincount(out.ravel(), minlength=256)
            yield row, out

    def report(self) -> LabelReport:
        """What the strips held (call after iterating :meth:`strips` to the end)."""
        image, options = self.image, self.options
        by_path = {r.path: r for r in self.covering.rasters}
        vector = self.covering.vector
        hist = self._hist[: options.num_classes].astype(int).tolist()
        return LabelReport(
            sources=list(self._used),
            source_crs=[str(by_path[p].crs) if p in by_path else str(vector.crs if vector else "") for p in self._used],
            source_res=[(by_path[p].transform[0], -by_path[p].transform[4]) if p in by_path else None for p in self._used],
            image_crs=str(image.crs),
            image_res=(image.transform[0], -image.transform[4]),
            coverage=float(sum(hist)) / max(image.width * image.height, 1),
            histogram=hist,
            unmapped=sorted(self._unmapped, key=numeric_first),
            method=list(self._used.values()),
        )


def align_labels(image: RasterInfo, sources: LabelSources, options: LabelOptions) -> tuple[np.ndarray, LabelReport]:
    """Every label source covering ``image`` on its grid, in memory (see :class:`Alignment`).

    Returns:
        (uint8 label array [H, W], the :class:`LabelReport`). Unmapped values are reported, not
        raised (see :func:`aligned_labels`).
    """
    alignment = Alignment(image, sources, options)
    labels = np.concatenate([strip for _, strip in alignment.strips()])
    return labels, alignment.report()


# ----- the cache ----------------------------------------------------------------------------


def cache_key(image: RasterInfo, covering: LabelSources, options: LabelOptions) -> str:
    """Key of an aligned label raster: the image's and labels' :func:`~geobp.sources.locations.file_stamp` (paths,
    sizes and mtimes; a URL without its signature), and the options."""
    raw = "\n".join([str(LABEL_CACHE_VERSION), file_stamp(image.path), *map(file_stamp, covering.paths), options.key()])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


class _Unmapped(Exception):
    """Internal: stops writing an aligned raster that holds unmapped values."""


def _write_aligned(path: Path, alignment: Alignment) -> LabelReport:
    """Write the aligned labels strip by strip, atomically: tiled like the image (or 256 px), deflate-compressed.

    Nothing is written when the labels hold unmapped values (raises :class:`_Unmapped`).
    """
    image = alignment.image
    with open_raster(image.path) as src:
        profile = src.profile
    # the image's blocks when GeoTIFF tiles can have them, so tiles placed in image blocks decode one mask block
    bh, bw = image.block_height, image.block_width
    blocks = (bh, bw) if bh % 16 == 0 and bw % 16 == 0 else (256, 256)
    profile = derive_profile(profile, count=1, dtype="uint8", nodata=None, blockysize=blocks[0], blockxsize=blocks[1])
    rows = strip_rows(image.width, blocks[0])  # whole blocks per strip
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            for row, strip in alignment.strips(rows):
                dst.write(strip, 1, window=Window(0, row, image.width, strip.shape[0]))
        report = alignment.report()
        if report.unmapped:
            raise _Unmapped()
    return report


def aligned_labels(
    image: RasterInfo,
    sources: LabelSources,
    options: LabelOptions,
    cache_root: str | Path,
    strict: bool = True,
    owner: bool = True,
) -> tuple[RasterInfo | None, LabelReport]:
    """The image's label raster from the cache, aligning it first when missing or out of date.

    Args:
        image: the image's header.
        sources: all label sources of the dataset.
        options: value mapping and rasterization options.
        cache_root: the folder that holds ``.geobp_cache/`` (the dataset root or the images' folder).
        strict: raise on unmapped values (``fit``); ``geobp check`` passes False to report them.
        owner: this process aligns the scene when the cache lacks it; other processes of the node
            wait for the owner's files (:func:`geobp.data.ranks.computed_once`). A failed
            alignment (unmapped values) is cached as its report, so every process raises the same error.

    Returns:
        (header of the aligned uint8 label raster, or None when unmapped values kept it from
        being written (only without ``strict``); the :class:`LabelReport`).

    Raises:
        LabelError: ``strict`` and some raw values are neither mapped nor class ids.
        RasterReadError: a label file cannot be read.
    """
    covering = covering_sources(image, sources)
    key = cache_key(image, covering, options)
    folder = Path(cache_root) / CACHE_DIR / "labels"
    stem = file_stem(image.path)
    tif, meta = folder / f"{stem}.{key}.tif", folder / f"{stem}.{key}.json"

    def load() -> LabelReport | None:
        try:
            data = json.loads(meta.read_text())
            data["source_res"] = [tuple(r) if r else None for r in data["source_res"]]
            data["image_res"] = tuple(data["image_res"])
            report = LabelReport(**data)
        except (OSError, ValueError, TypeError):
            return None  # missing or broken: (re)built
        return report if report.unmapped or tif.exists() else None

    def compute() -> LabelReport:
        alignment = Alignment(image, sources, options)
        try:
            report = _write_aligned(tif, alignment)
        except _Unmapped:  # no raster is written; the report (with the unmapped values) is, for the other processes
            report = alignment.report()
        with atomic_path(meta, suffix=".json") as tmp:
            tmp.write_text(redact(json.dumps(asdict(report))))  # a cache index: no signature written down
        return report

    report = computed_once(meta, load, compute, owner)
    if report.unmapped:
        if strict:
            raise unmapped_error(", ".join(report.sources) or image.path, report.unmapped, options)
        return None, report
    return read_info(tif), report


# ----- scenes -------------------------------------------------------------------------------


def find_labelled_scenes(
    images: str | Path | Sequence[str | Path],
    labels: str | Path | Sequence[str | Path],
    options: LabelOptions,
    cache_root: str | Path | None = None,
    progress: bool = False,
) -> tuple[list[Scene], list[LabelReport]]:
    """Images with their labels aligned onto their grids (from the cache when up to date).

    Scenes that no label reaches (no labelled pixel) are left out with a warning.

    Args:
        images: a folder, a glob, a GeoTIFF, or a list of them (one scene per file).
        labels: the label sources (see the module docstring).
        options: value mapping and rasterization options.
        cache_root: the folder that gets ``.geobp_cache/``; when None, the first image's folder, or for
            remote images the local :func:`~geobp.sources.locations.default_cache_dir`.
        progress: show a progress bar while aligning.

    Returns:
        (scenes whose ``mask`` is the aligned label raster, their label reports), same order.

    Raises:
        DataNotFoundError: no image, or no scene with a labelled pixel.
        ConfigError: two images share a file name.
        LabelError: raw label values neither mapped nor class ids.
        RasterReadError, GeoreferenceError, BandMismatchError: as for ``images/`` + ``masks/``.
    """
    from rich.progress import track

    paths = expand_paths(images, RASTER_SUFFIXES, "images")
    seen: dict[str, str | Path] = {}
    for p in paths:
        if file_stem(p) in seen:
            raise ConfigError(format_error(p, f"same file name as {seen[file_stem(p)]} (scene names must be unique)", "rename one of them"))
        seen[file_stem(p)] = p
    headers = [check_headers(file_stem(p), p, None, require_mask=False) for p in paths]
    check_consistency(headers)
    for h in headers:
        for problem in h.problems:
            if problem.severity == "fatal" and problem.error is not None:
                raise problem.error
    sources = find_label_sources(labels, options.label_field)
    root = cache_root_for(paths, cache_root)
    # processes of a node split the alignments (process r aligns scenes r, r + n, ... first, then
    # picks up the others' from the cache); a single process aligns them all
    rank, size = local_rank(), local_world_size()
    order = sorted(range(len(headers)), key=lambda i: (i % size != rank, i))
    found: dict[int, tuple[RasterInfo | None, LabelReport]] = {}
    for i in track(order, description="Aligning labels", disable=not progress or len(headers) < 2, transient=True):
        image = headers[i].image
        assert image is not None
        found[i] = aligned_labels(image, sources, options, root, owner=i % size == rank)
    scenes, reports = [], []
    for i, h in enumerate(headers):
        assert h.image is not None
        mask, report = found[i]
        if report.coverage == 0:
            warnings.warn(
                format_error(h.image.path, "no label covers this image: the scene is left out", "check data.labels (paths, CRS, extent)"),
                stacklevel=2,
            )
            continue
        scenes.append(Scene(h.name, h.image, mask))
        reports.append(report)
    if not scenes:
        raise DataNotFoundError(
            format_error(", ".join(sources.paths[:3]), "no label covers any image", "check that data.labels and data.images cover the same area")
        )
    return scenes, reports


def check_labelled_dataset(
    images: str | Path | Sequence[str | Path],
    labels: str | Path | Sequence[str | Path],
    options: LabelOptions,
    cache_root: str | Path | None = None,
    nodata: float | None = None,
    full: bool = True,
    progress: bool = False,
) -> list[SceneReport]:
    """``geobp check`` for ``data.images`` + ``data.labels``: every problem of every scene, and its label report.

    Each scene's labels are aligned (through the cache) without stopping at unmapped values:
    they become a fatal problem of the scene, and ``label_report`` lists them with the label
    sources, their CRS and resolution, the coverage and the class histogram.

    Args:
        images, labels, options, cache_root: as in :func:`find_labelled_scenes`.
        nodata: image nodata value; the files' tags when None.
        full: also read every block of every image.
        progress: show a progress bar.

    Raises:
        DataNotFoundError: no image, or the label sources cannot be found.
    """
    from rich.progress import track

    paths = expand_paths(images, RASTER_SUFFIXES, "images")
    reports = [check_headers(file_stem(p), p, None, require_mask=False) for p in paths]
    check_consistency(reports)
    sources = find_label_sources(labels, options.label_field)
    root = cache_root_for(paths, cache_root)
    for r in track(reports, description="Aligning labels", disable=not progress, transient=True):
        if r.fatal or r.image is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the coverage check below says it once, in the report
                r.mask, r.label_report = aligned_labels(r.image, sources, options, root, strict=False)
        except GeobpError as err:
            r.problems.append(Problem("fatal", str(err), err))
            continue
        rep = r.label_report
        if rep.unmapped:
            err = unmapped_error(", ".join(rep.sources) or r.image.path, rep.unmapped, options)
            r.problems.append(Problem("fatal", str(err), err))
        elif rep.coverage == 0:
            r.problems.append(
                Problem("warning", format_error(r.image.path, "no label covers this image (left out of training)", "check data.labels"))
            )
        if full:
            scan_pixels(r, options.num_classes, options.ignore_index, nodata)
    return reports
