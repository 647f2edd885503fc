"""``SceneStack``: the bands of several sources, each in its own CRS, resolution, dtype and nodata,
read as one window on a reference grid.

A scene is a reference grid and an ordered list of bands. :func:`build_stack` makes one from
:class:`~geobp.sources.bandref.BandRef` lists:

- the reference source (e.g. a Sentinel-2 item, one file per band at 10, 20 and 60 m) gives the
  grid: that of its finest-resolution file (ties: the first listed);
- every other source (Sentinel-1, a DEM, ...) lists its files in any CRS and resolution; those
  whose footprint does not overlap the reference scene are dropped, so one list of DEM tiles
  serves every scene. A source with no file over the scene leaves the scene out (``missing="skip"``,
  the default, with a warning naming the source) or is read as nodata (``missing="fill"``).

Bands are named ``<source>:<band>`` when a scene has several sources (``s2:B04``, ``s1:VV``,
``dem:elevation``), else by the band name alone. Several BandRefs of one source under one name
are the tiles of one band: a **mosaic** in which the first file (in the order given) with a valid
pixel wins. Tiles on one pixel lattice are read as one mosaic VRT (so a seam is interpolated as in
a merged file); tiles on different lattices are warped each and the mosaic holding the earlier
file wins.

:meth:`SceneStack.read` reads a window of every band onto the reference grid: a plain windowed
read when the band's file is on the reference pixel lattice (same CRS and pixel size, origin an
integer number of pixels away), otherwise through a :class:`rasterio.vrt.WarpedVRT` onto the
reference grid with the band's resampling (the same values as :func:`rasterio.warp.reproject` of
the band onto the reference grid). Bands of one source whose files share a grid (Sentinel-2's 20 m
bands, Sentinel-1's VV and VH) are warped together, each with its own nodata; the warped rasters
are computed in blocks of ``warp_block`` px (:func:`warp_block_for` the tile size) and cached in
GDAL's block cache.
Warped together, at the rim of one band's own nodata holes GDAL's warper interpolates from the
valid neighbours where a one-band reproject gives nodata (a pixel wide), and its approximate
transformer (0.125 px) may place pixels slightly differently than a one-band reproject.

A pixel is **valid** when every band has data there: not its nodata value, not NaN, inside a
file. So a pixel is invalid where the reference source has no data, or where any other source
has none (a scene's valid pixels are those a model can use: every input is known).

File handles are opened lazily, in the process that reads, and kept in a per-process cache of
bounded size (a DataLoader worker, forked or spawned, opens its own).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from geobp.errors import ConfigError, RasterReadError, format_error
from geobp.raster import RasterInfo
from geobp.sources.bandref import BandRef
from geobp.sources.files import DATASETS, close_datasets, is_inline_vrt, local_path, open_band_file, read_header
from geobp.sources.grid import Grid, coverage, overlaps
from geobp.sources.vrt import mosaic_vrt, stack_vrt, warped_vrt

__all__ = ["Grid", "Missing", "SceneLeftOutWarning", "SceneStack", "SourceSummary", "StackBand", "build_stack", "build_stacks", "close_datasets",
           "read_header", "warp_block_for"]

#: What to do with a source that has no file over a scene: leave the scene out, or read the source as nodata.
Missing = Literal["skip", "fill"]


class SceneLeftOutWarning(UserWarning):
    """A scene left out because another source has no file over it (``missing="skip"``)."""


def warp_block_for(tile_size: int) -> int:
    """The warp block (px) for tiles of ``tile_size`` px: half the tile size, at least 16.

    Tiles do not fall on a grid of the tile size (a training tile lies at any offset inside a block
    of the reference file, inference tiles overlap), so a tile of ``t`` px spans up to
    ``(t / b + 1)^2`` blocks of ``b`` px, and ``(t + b)^2`` pixels are warped for the ``t^2`` it
    uses: 4x with ``b = t``, 2.25x with ``b = t / 2``; smaller blocks add more per-block work than
    they save (section 4c of BENCHMARKS.md).
    """
    return max(16, tile_size // 2)


# ----- the stack ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """Files of one band on one pixel lattice, read as one dataset (the file, or a mosaic VRT of them)."""

    path: str  # the file, or the mosaic VRT's XML
    band: int  # band index in ``path``
    grid: Grid
    offset: tuple[int, int] | None  # the reference origin's (row, col) on this lattice; None: warped
    src_nodata: float | None
    dtype: str  # of the file
    files: tuple[str, ...]


@dataclass(frozen=True)
class StackBand:
    """One band of a scene: its name, source, how it is resampled, its dtype and nodata, and its files.

    ``dtype`` and ``nodata`` are what :meth:`SceneStack.read` gives with ``out_dtype=None``: the
    file's, except that an integer band with no nodata value that must be warped is read as
    float32 with NaN for nodata (to tell pixels outside its files from data).
    """

    name: str
    source: str
    resampling: str
    dtype: str
    nodata: float | None
    parts: tuple[_Part, ...]

    @property
    def files(self) -> tuple[str, ...]:
        """The band's files over the scene, in mosaic order."""
        return tuple(f for p in self.parts for f in p.files)


@dataclass(frozen=True)
class SourceSummary:
    """One source of a scene, for ``geobp check``: CRSs, pixel sizes, bands, files, and how much of the
    reference footprint its files cover (0 to 1)."""

    source: str
    crs: tuple[str, ...]
    res: tuple[tuple[float, float], ...]
    bands: tuple[str, ...]
    files: tuple[str, ...]
    coverage: float


def _valid(values: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """Where ``values`` hold data (None: everywhere)."""
    if values.dtype.kind == "f":
        if nodata is None or math.isnan(nodata):
            return ~np.isnan(values)
        return (values != nodata) & ~np.isnan(values)
    if nodata is None:
        return None
    return values != nodata


class SceneStack:
    """A scene: a reference grid and bands from one or several sources, read as windows of that grid.

    Built by :func:`build_stack`. Holds no open file: datasets are opened on the first read in each
    process (see the module docstring).

    Args:
        grid: the reference grid.
        bands: the bands, in the order :meth:`read` stacks them.
        summaries: one per source, reference first (:meth:`describe`).
        warp_block: block size (px) of the warped bands' virtual rasters, warped and cached a block
            at a time: :func:`warp_block_for` the tile size.
    """

    def __init__(self, grid: Grid, bands: Sequence[StackBand], summaries: Sequence[SourceSummary],
                 warp_block: int = 256) -> None:
        if not bands:
            raise ConfigError(format_error(None, "a scene stack needs at least one band", "list the reference's bands"))
        if warp_block < 16:
            raise ConfigError(format_error(None, f"warp_block {warp_block} is too small (expected at least 16 px)",
                                           "set it to warp_block_for(tile size)"))
        self.grid = grid
        self.warp_block = warp_block
        self.bands = tuple(bands)
        self._summaries = tuple(summaries)
        self._plan = _warp_groups(self.bands)

    def __repr__(self) -> str:
        return f"SceneStack({self.grid.width}x{self.grid.height} {self.grid.crs}, bands={list(self.band_names)})"

    @property
    def band_names(self) -> tuple[str, ...]:
        """``<source>:<band>`` when the scene has several sources, else the band names."""
        return tuple(b.name for b in self.bands)

    @property
    def dtypes(self) -> tuple[str, ...]:
        """Each band's dtype as :meth:`read` gives it with ``out_dtype=None``."""
        return tuple(b.dtype for b in self.bands)

    @property
    def nodata(self) -> tuple[float | None, ...]:
        """Each band's nodata value (NaN for float sources without one; None: every pixel inside its files is data)."""
        return tuple(b.nodata for b in self.bands)

    @property
    def sources(self) -> tuple[str, ...]:
        """The sources, reference first."""
        return tuple(s.source for s in self._summaries)

    def describe(self) -> tuple[SourceSummary, ...]:
        """One :class:`SourceSummary` per source, reference first."""
        return self._summaries

    def read(self, window: Window, out_dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Every band's pixels in ``window`` of the reference grid.

        Args:
            window: integer window of the reference grid; parts outside it read as invalid.
            out_dtype: the output dtype (float32 by default); None: the bands' common dtype
                (:func:`numpy.result_type` of :attr:`dtypes`: uint16 for Sentinel-2 alone).

        Returns:
            (array [C, h, w], valid [h, w] bool). A band's pixels where it has no data hold its
            nodata value (0 in an integer output where that value is NaN); ``valid`` is False
            wherever any band has no data.

        Raises:
            RasterReadError: a file cannot be opened or a block cannot be decoded.
        """
        dtype = np.result_type(*self.dtypes) if out_dtype is None else np.dtype(out_dtype)
        row, col, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + h, self.grid.height), min(col + w, self.grid.width)
        inside = r1 > r0 and c1 > c0
        whole = (r0, c0, r1, c1) == (row, col, row + h, col + w)
        out = np.empty((len(self.bands), h, w), dtype)
        valid = np.zeros((h, w), bool)
        if not whole:
            for i, band in enumerate(self.bands):
                out[i] = _fill_value(band.nodata, dtype)
        if not inside:
            return out, valid
        inner = Window(c0, r0, c1 - c0, r1 - r0)
        rows, cols = slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)
        ok = np.ones((r1 - r0, c1 - c0), bool)
        for group in self._plan:
            if len(group) == 1:
                results = [self._read_band(self.bands[group[0]], inner)]
            else:  # single-file bands on one grid: warped together
                results = self._warp([self.bands[i] for i in group], [self.bands[i].parts[0] for i in group], inner)
            for i, (values, band_valid) in zip(group, results):
                if values.dtype.kind == "f" and dtype.kind != "f":  # NaN has no integer value
                    values = np.where(np.isnan(values), 0, values)
                out[i, rows, cols] = values
                if band_valid is not None:
                    ok &= band_valid
        valid[rows, cols] = ok
        return out, valid

    def _read_band(self, band: StackBand, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        """One band in ``window`` (inside the reference grid): (values, valid or None for all valid)."""
        shape = (int(window.height), int(window.width))
        if not band.parts:  # a source with no file over the scene, read as nodata (missing="fill")
            return np.full(shape, _fill_value(band.nodata, np.dtype(band.dtype)), band.dtype), np.zeros(shape, bool)
        values, valid = self._read_part(band, band.parts[0], window)
        for part in band.parts[1:]:  # the mosaic: the first part with data wins
            if valid is None or valid.all():  # None: every pixel has data
                break
            more, more_valid = self._read_part(band, part, window)
            take = ~valid if more_valid is None else more_valid & ~valid
            values[take] = more[take]
            valid = valid | take
        return values, valid

    def _read_part(self, band: StackBand, part: _Part, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        if part.offset is not None:
            return self._read_lattice(band, part, window)
        return self._warp([band], [part], window)[0]

    def _warp(self, bands: Sequence[StackBand], parts: Sequence[_Part], window: Window) -> list[tuple[np.ndarray, np.ndarray]]:
        """Bands whose files share one grid, read as ``window`` of one ``WarpedVRT`` onto the reference grid.

        The VRT is the reference grid exactly (CRS, transform, size), so a window of it holds the
        values of ``rasterio.warp.reproject`` of the bands onto that grid (GDAL's warper in both).
        Several bands share one VRT (over a VRT stacking their files), so the pixel mapping is
        computed once for all of them; each band keeps its own nodata (``UNIFIED_SRC_NODATA=NO``).
        """
        band = bands[0]
        nodata = band.nodata if band.nodata is not None else math.nan
        key = ("warp", tuple((p.path, p.band) for p in parts), self.grid, self.warp_block, band.resampling, band.dtype,
               _key(nodata), _key(parts[0].src_nodata))
        vrt = DATASETS.get(key, lambda: self._open_warped(band, parts, nodata))
        try:
            data = vrt.read(list(range(1, len(parts) + 1)), window=window)
        except RasterioIOError as err:
            raise _read_error(parts[0], window, err) from err
        return [(values, _valid(values, nodata)) for values in data]

    def _open_warped(self, band: StackBand, parts: Sequence[_Part], nodata: float) -> Any:
        if len(parts) == 1:
            src = _open_part(parts[0])
        else:
            src = open_band_file(stack_vrt([(p.path, p.band) for p in parts], parts[0].grid,
                                           [p.src_nodata for p in parts], parts[0].dtype))
        try:
            xml = warped_vrt(src, self.grid, band.resampling, parts[0].src_nodata, nodata, band.dtype, self.warp_block)
        finally:
            src.close()
        return open_band_file(xml)  # opens its own source

    def _read_lattice(self, band: StackBand, part: _Part, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        """A plain windowed read of a file on the reference lattice (padded where the window leaves it)."""
        src = DATASETS.get(("file", part.path), lambda: _open_part(part))
        assert part.offset is not None
        row, col = int(window.row_off) + part.offset[0], int(window.col_off) + part.offset[1]
        h, w = int(window.height), int(window.width)
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + h, part.grid.height), min(col + w, part.grid.width)
        try:
            if (r0, c0, r1, c1) == (row, col, row + h, col + w):
                values = src.read(part.band, window=Window(col, row, w, h))
                return _as_band(values, band), _part_valid(values, part, band)
            values = np.full((h, w), _fill_value(band.nodata, np.dtype(band.dtype)), band.dtype)
            valid = np.zeros((h, w), bool)
            if r1 > r0 and c1 > c0:
                inner = src.read(part.band, window=Window(c0, r0, c1 - c0, r1 - r0))
                values[r0 - row : r1 - row, c0 - col : c1 - col] = inner
                inner_valid = _part_valid(inner, part, band)
                valid[r0 - row : r1 - row, c0 - col : c1 - col] = True if inner_valid is None else inner_valid
        except RasterioIOError as err:
            raise _read_error(part, window, err) from err
        return values, valid


def _warp_groups(bands: Sequence[StackBand]) -> list[tuple[int, ...]]:
    """Band indices in read order: bands from one file each on one warped grid (same resampling, dtype
    and nodata) are grouped, to be warped together; every other band alone."""
    groups: dict[Any, list[int]] = {}
    for i, b in enumerate(bands):
        if len(b.parts) == 1 and b.parts[0].offset is None and not is_inline_vrt(b.parts[0].path):
            p = b.parts[0]
            key: Any = (p.grid, b.resampling, b.dtype, p.dtype, _key(b.nodata), _key(p.src_nodata))
        else:
            key = i
        groups.setdefault(key, []).append(i)
    return [tuple(g) for g in groups.values()]


def _key(value: float | None) -> Any:
    """A nodata value as a dict key (NaN != NaN)."""
    return "nan" if value is not None and math.isnan(value) else value


def _fill_value(nodata: float | None, dtype: np.dtype) -> float:
    """What fills a band where it has no data in an output of ``dtype``."""
    if nodata is None or (math.isnan(nodata) and dtype.kind != "f"):
        return 0
    return nodata


def _as_band(values: np.ndarray, band: StackBand) -> np.ndarray:
    return values if values.dtype == band.dtype else values.astype(band.dtype)


def _part_valid(values: np.ndarray, part: _Part, band: StackBand) -> np.ndarray | None:
    """Where a part's raw values hold data: not its own nodata (which may differ from the band's)."""
    nodata = part.src_nodata
    if values.dtype.kind == "f" and nodata is None:
        nodata = math.nan
    return _valid(values, nodata)


def _open_part(part: _Part) -> Any:
    """A part's dataset: its file (by absolute path, as a warped VRT names its source), or its mosaic VRT."""
    return open_band_file(local_path(part.path))


def _read_error(part: _Part, window: Window, err: Exception) -> RasterReadError:
    files = ", ".join(part.files)
    return RasterReadError(format_error(
        files, f"failed to read window (row {int(window.row_off)}, col {int(window.col_off)}, "
               f"{int(window.height)}x{int(window.width)}): {err}",
        "the file is probably truncated, corrupt or unreachable; re-download it or remove the scene"))


# ----- building a stack ---------------------------------------------------------------------

def _parts(reference: Grid, refs: Sequence[BandRef], infos: Sequence[RasterInfo],
           nodata: Sequence[float | None]) -> tuple[_Part, ...]:
    """A band's files grouped by pixel lattice (in the order of each group's first file), each group one part."""
    groups: list[list[int]] = []
    for i, info in enumerate(infos):
        grid = Grid.from_info(info)
        for g in groups:
            if Grid.from_info(infos[g[0]]).lattice_offset(grid) is not None:
                g.append(i)
                break
        else:
            groups.append([i])
    parts = []
    for g in groups:
        if len(g) == 1:
            path, band, grid = refs[g[0]].path, refs[g[0]].band, Grid.from_info(infos[g[0]])
        else:
            path, grid = mosaic_vrt([refs[i] for i in g], [infos[i] for i in g], [nodata[i] for i in g])
            band = 1
        parts.append(_Part(path, band, grid, reference.lattice_offset(grid), nodata[g[0]], infos[g[0]].dtype,
                           tuple(refs[i].path for i in g)))
    return tuple(parts)


def _finest(infos: Sequence[RasterInfo]) -> int:
    """Index of the finest-resolution file (smallest pixel area); the first on ties."""
    areas = [abs(i.transform[0] * i.transform[4]) for i in infos]
    return min(range(len(infos)), key=lambda k: (round(areas[k] / min(areas), 9), k))


def _group_by_name(source: str, refs: Sequence[BandRef]) -> dict[str, list[int]]:
    names: dict[str, list[int]] = {}
    for i, ref in enumerate(refs):
        if ref.source and source and ref.source != source:
            raise ConfigError(format_error(ref.path, f"band {ref.name!r} is listed under source {source!r} but "
                                                     f"names source {ref.source!r}", "list it under its own source"))
        names.setdefault(ref.name, []).append(i)
    return names


def _band_name(source: str, name: str, several: bool) -> str:
    if not several or name.startswith(f"{source}:"):
        return name
    return f"{source}:{name}"


def build_stack(
    reference: Sequence[BandRef],
    others: Mapping[str, Sequence[BandRef]] | None = None,
    *,
    missing: Missing = "skip",
    warp_block: int = 256,
    headers: dict[str, RasterInfo] | None = None,
) -> SceneStack | None:
    """One scene: the reference source's bands and every other source's bands over it.

    Args:
        reference: the reference source's bands, one BandRef per file band (several under one name:
            the tiles of a mosaic). The finest-resolution file gives the reference grid (ties: the
            first listed). Their ``source`` names the reference source (``s2``).
        others: source name -> its BandRefs, in any CRS and resolution: the files of every scene
            may be listed; those not overlapping this scene are dropped. BandRefs under one name are
            the tiles of one band (first valid pixel wins); bands keep the order of first mention.
        missing: a source with no file over the scene: ``"skip"`` (default) returns None with a
            warning naming the source (every pixel would be invalid); ``"fill"`` reads it as nodata.
        warp_block: block size of the warped bands (see :class:`SceneStack`): :func:`warp_block_for` the tile size.
        headers: a cache of file headers by path, shared across calls (see :func:`build_stacks`).

    Returns:
        The :class:`SceneStack`, or None when ``missing="skip"`` and a source has no file over the scene.

    Raises:
        ConfigError: no reference band, a source without a name or without files, a band listed
            under another source, or an unknown ``missing``.
        DataNotFoundError, RasterReadError: a file is missing or unreadable (the message names it).
        GeoreferenceError: a file has no CRS or is not north-up.
    """
    if missing not in ("skip", "fill"):
        raise ConfigError(format_error(None, f"unknown missing={missing!r} (expected 'skip' or 'fill')",
                                       "use 'skip' to leave such scenes out, 'fill' to read the source as nodata"))
    if not reference:
        raise ConfigError(format_error(None, "no reference band given", "list the reference source's BandRefs"))
    others = dict(others or {})
    headers = {} if headers is None else headers

    def info(path: str) -> RasterInfo:
        if path not in headers:
            headers[path] = read_header(path)
        return headers[path]

    ref_source = reference[0].source
    several = bool(others)
    if several and not ref_source:
        raise ConfigError(format_error(reference[0].path, "the reference source has no name while other sources are "
                                       f"given ({', '.join(others)})", "set BandRef.source on the reference's bands (e.g. 's2')"))
    if ref_source in others:
        raise ConfigError(format_error(None, f"source {ref_source!r} is both the reference and another source",
                                       "give each source its own name"))
    ref_infos = [info(r.path) for r in reference]
    grid = Grid.from_info(ref_infos[_finest(ref_infos)])

    bands: list[StackBand] = []
    summaries: list[SourceSummary] = []
    for source, refs in [(ref_source, list(reference)), *others.items()]:
        if not source and several:
            raise ConfigError(format_error(None, "a source has an empty name", "name every source (e.g. 's1', 'dem')"))
        if not refs:
            raise ConfigError(format_error(None, f"source {source!r} lists no file", f"list its BandRefs or remove {source!r}"))
        infos = [info(r.path) for r in refs]
        if source == ref_source:
            keep = list(range(len(refs)))
        else:
            keep = [i for i, inf in enumerate(infos) if overlaps(grid, Grid.from_info(inf))]
        if not keep and missing == "skip":
            warnings.warn(format_error(
                reference[0].path, f"source {source!r} has no file over this scene ({len(refs)} file(s) listed, "
                                   "none overlaps it): the scene is left out",
                f"add {source!r} files that cover it, or set missing='fill' to read {source!r} as nodata"),
                SceneLeftOutWarning, stacklevel=2)
            return None
        for name, members in _group_by_name(source, refs).items():
            first = infos[members[0]]
            nodata = [refs[i].nodata if refs[i].nodata is not None else infos[i].nodata for i in members]
            used = [i for i in members if i in keep]
            parts = _parts(grid, [refs[i] for i in used], [infos[i] for i in used],
                           [nodata[members.index(i)] for i in used])
            dtype, band_nodata = first.dtype, nodata[0]
            if band_nodata is None and np.dtype(dtype).kind == "f":
                band_nodata = math.nan
            if band_nodata is None and any(p.offset is None for p in parts):
                dtype, band_nodata = "float32", math.nan  # warped without nodata: NaN marks where no file reaches
            bands.append(StackBand(_band_name(source, name, several), source, refs[members[0]].resampling,
                                   dtype, band_nodata, parts))
        kept = [Grid.from_info(infos[i]) for i in keep]
        summaries.append(SourceSummary(
            source=source,
            crs=tuple(dict.fromkeys(g.crs for g in kept)),
            res=tuple(dict.fromkeys(g.res for g in kept)),
            bands=tuple(_band_name(source, n, several) for n in _group_by_name(source, refs)),
            files=tuple(dict.fromkeys(refs[i].path for i in keep)),
            coverage=coverage(grid, kept) if kept else 0.0,
        ))
    return SceneStack(grid, bands, summaries, warp_block)


def build_stacks(
    references: Sequence[Sequence[BandRef]],
    others: Mapping[str, Sequence[BandRef]] | None = None,
    *,
    missing: Missing = "skip",
    warp_block: int = 256,
) -> list[SceneStack]:
    """:func:`build_stack` for every reference scene against the same other sources' files.

    Each file's header is read once, whatever the number of scenes. Scenes left out
    (``missing="skip"``) are warned about and absent from the list.
    """
    headers: dict[str, RasterInfo] = {}
    stacks = [build_stack(ref, others, missing=missing, warp_block=warp_block, headers=headers) for ref in references]
    return [s for s in stacks if s is not None]
