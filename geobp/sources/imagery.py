"""``data.images`` and ``geobp infer``'s inputs as published: STAC documents and several sources per scene.

:func:`resolve_images` turns an images specification into one raster path per scene:

- files (a folder, a glob, a GeoTIFF, URLs, a list of them): one scene per file, as before; None is
  returned and the caller lists them itself;
- a STAC Item, ItemCollection, Collection or Catalog (a ``.json`` path or URL): one scene per item,
  its band assets (one COG per band, at several resolutions) stacked onto the grid of the finest
  selected asset;
- a mapping ``{source: spec}`` of several sources (``{s2: items.json, s1: s1/*.tif, dem: dem.vrt}``):
  the first source's scenes are the scenes, each other source's files are paired with every scene
  by footprint (mosaicked where several cover it) and resampled onto its grid at read time. A spec
  is any of the forms above, or ``{images: ..., resampling: bilinear, nodata: ...}``.

Stacked scenes are named by stack paths (:mod:`~geobp.sources.stackpath`) that every raster reader
of geobp opens. Band names: a STAC band keeps the name it was selected by (its asset key when all
bands are taken); a file's band its description, else ``band_<i>``; with several sources every band
is ``<source>:<band>`` (``s2:B04``, ``s1:VV``, ``dem:band_1``).

Band selection (``bands``): for one STAC source, asset keys, band names, common names or 1-based
positions (:func:`~geobp.sources.stac.select_bands`); for several sources ``<source>:<band>`` where
``<band>`` is any of those for a STAC source, a band description or a 1-based index for files; a bare
band name is accepted when exactly one source has it. The bands are stacked in the order asked.

A scene that another source does not cover is left out with a warning naming the source (a scene
whose every pixel would be nodata cannot train or be predicted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geobp.bands import band_number, default_band_name
from geobp.errors import ConfigError, format_error
from geobp.raster import RASTER_SUFFIXES, RasterInfo
from geobp.sources.bandref import BandRef
from geobp.sources.files import read_header
from geobp.sources.grid import Grid
from geobp.sources.locations import expand_paths, file_stem
from geobp.sources.stack import SceneStack, build_stack
from geobp.sources.stackreader import stack_path
from geobp.sources.urls import redact

__all__ = ["SourceSpec", "is_stac", "is_stacked", "parse_sources", "resolve_images"]

#: Suffixes of STAC documents.
STAC_SUFFIXES = (".json", ".geojson")
#: Keys of a source given as a mapping.
SOURCE_KEYS = ("images", "resampling", "nodata")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a scene: its name, where its images are, and how they are read."""

    name: str
    images: str | list[str]
    resampling: str | None = None  # None: bilinear, or nearest for categorical STAC assets
    nodata: float | None = None  # None: the files' or the STAC item's


def is_stac(spec: Any) -> bool:
    """Whether ``spec`` names a STAC document (a ``.json``/``.geojson`` path or URL)."""
    if not isinstance(spec, (str, Path)):
        return False
    name = str(spec).split("?", 1)[0].split("#", 1)[0].lower()
    return name.endswith(STAC_SUFFIXES)


def is_stacked(spec: Any) -> bool:
    """Whether ``spec`` needs stacking: a STAC document or a mapping of sources."""
    return isinstance(spec, Mapping) or is_stac(spec) or (
        isinstance(spec, (list, tuple)) and len(spec) == 1 and is_stac(spec[0]))


def parse_sources(spec: Mapping[str, Any]) -> list[SourceSpec]:
    """The sources of a mapping, in order (the first is the reference).

    Raises:
        ConfigError: an empty mapping, a bad source name, an unknown key, or a source without images.
    """
    if not spec:
        raise ConfigError(format_error(None, "data.images is an empty mapping", "give {source: files or STAC document}"))
    out = []
    for name, value in spec.items():
        if not isinstance(name, str) or not name or ":" in name or name.strip() != name:
            raise ConfigError(format_error(None, f"bad source name {name!r} in data.images",
                                           "name sources with a plain word (s2, s1, dem)"))
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(SOURCE_KEYS))
            if unknown or "images" not in value:
                raise ConfigError(format_error(None, f"source {name!r}: " + (f"unknown key(s) {', '.join(map(str, unknown))}"
                                                                                 if unknown else "no 'images' key"),
                                               f"give {{images: ..., resampling: ..., nodata: ...}} (keys: {', '.join(SOURCE_KEYS)})"))
            images, resampling, nodata = value["images"], value.get("resampling"), value.get("nodata")
        else:
            images, resampling, nodata = value, None, None
        if not isinstance(images, (str, Path, list, tuple)) or not images:
            raise ConfigError(format_error(None, f"source {name!r} has no images ({images!r})",
                                           "give a folder, glob, file, URL or STAC document"))
        images = [str(i) for i in images] if isinstance(images, (list, tuple)) else str(images)
        out.append(SourceSpec(name, images, resampling, None if nodata is None else float(nodata)))
    return out


# ----- one source's bands --------------------------------------------------------------------

@dataclass
class _Scene:
    """A reference scene before stacking: its name and band refs (per band name, in order)."""

    name: str
    refs: list[BandRef]


def _stac_items(spec: SourceSpec) -> list[Any]:
    from geobp.sources.stac import load_items  # pystac: only when STAC is used

    docs = spec.images if isinstance(spec.images, list) else [spec.images]
    return [item for doc in docs for item in load_items(doc)]


def _with(refs: Sequence[BandRef], spec: SourceSpec, source: str) -> list[BandRef]:
    changes: dict[str, Any] = {"source": source}
    if spec.resampling is not None:
        changes["resampling"] = spec.resampling
    if spec.nodata is not None:
        changes["nodata"] = spec.nodata
    return [dataclasses.replace(r, **changes) for r in refs]


def _file_refs(path: str, info: RasterInfo, spec: SourceSpec, source: str, wanted: list[str | int] | None) -> list[BandRef]:
    """The bands of one file: named by their description, else ``band_<i>``; ``wanted`` selects by name or index."""
    names = [(d or default_band_name(i)) for i, d in enumerate(info.descriptions or (None,) * info.count, start=1)]
    picks = list(range(1, info.count + 1)) if wanted is None else []
    for w in wanted or ():
        number = band_number(w, names, info.count)
        if number is None or not 1 <= number <= info.count:
            where = f"source {source!r} " if source else ""
            raise ConfigError(format_error(path, f"{where}has no band {w!r} (its bands: {', '.join(names)}, or 1.."
                                           f"{info.count})", "fix data.bands"))
        picks.append(number)
    return [BandRef(names[b - 1], path, band=b, resampling=spec.resampling or "bilinear", nodata=spec.nodata, source=source)
            for b in picks]


def _source_scenes(spec: SourceSpec, source: str, wanted: list[str | int] | None, headers: dict[str, RasterInfo],
                   what: str) -> list[_Scene]:
    """A source's scenes: one per STAC item, or one per file (``what`` names the option for messages)."""
    if is_stac(spec.images) or (isinstance(spec.images, list) and all(is_stac(i) for i in spec.images)):
        from geobp.sources.stac import select_bands

        return [_Scene(item.id, _with(select_bands(item, wanted), spec, source)) for item in _stac_items(spec)]
    scenes = []
    for path in expand_paths(spec.images, RASTER_SUFFIXES, what):
        p = str(path)
        if p not in headers:
            headers[p] = read_header(p)
        scenes.append(_Scene(file_stem(p), _file_refs(p, headers[p], spec, source, wanted)))
    return scenes


def _split_bands(bands: Sequence[str | int] | None, sources: list[SourceSpec]) -> tuple[dict[str, list[str | int] | None], list[str] | None]:
    """Per source, the bands asked of it (None: all), and the source of each band in the order asked."""
    if bands is None:
        return {s.name: None for s in sources}, None
    names = [s.name for s in sources]
    per: dict[str, list[str | int]] = {}
    order: list[str] = []
    for b in bands:
        text = str(b)
        source, sep, band = text.partition(":")
        if not sep:
            if len(sources) > 1:
                raise ConfigError(format_error(None, f"band {text!r} names no source (data.images has sources "
                                               f"{', '.join(names)})", f"write it as <source>:<band>, e.g. {names[0]}:{text}"))
            source, band = names[0], text
        if source not in names:
            raise ConfigError(format_error(None, f"band {text!r}: no source {source!r} in data.images (sources: "
                                           f"{', '.join(names)})", "fix the source name in data.bands"))
        per.setdefault(source, []).append(int(band) if band.isdigit() else band)
        order.append(source)
    if names[0] not in per:
        raise ConfigError(format_error(None, f"data.bands selects no band of the reference source {names[0]!r}",
                                       f"add one of its bands (e.g. {names[0]}:<band>), or put the source you want as the grid first"))
    return {n: per.get(n, []) for n in names}, order


def _ordered(stack: SceneStack, order: list[str] | None, per_source: dict[str, list[str]]) -> SceneStack:
    """``stack`` with its bands in the order asked: ``order`` gives each band's source, ``per_source``
    each source's band names (as the stack names them) in the order asked of it."""
    if order is None:
        return stack
    by_name = {b.name: b for b in stack.bands}
    taken = {s: iter(names) for s, names in per_source.items()}
    picked = [by_name[next(taken[s])] for s in order]
    return SceneStack(stack.grid, picked, stack.describe(), stack.warp_block)


def _names(source: str, refs: Sequence[BandRef], several: bool) -> list[str]:
    """A source's band names as the stack names them, in order, once each."""
    names = dict.fromkeys(r.name for r in refs)
    return [f"{source}:{n}" if several else n for n in names]


def resolve_images(
    spec: Any,
    bands: Sequence[str | int] | None = None,
    *,
    warp_block: int = 256,
) -> list[str] | None:
    """One path per scene for a STAC document or a mapping of sources; None for plain files.

    Args:
        spec: ``data.images`` (or ``geobp infer --images``): see the module docstring.
        bands: the band selection (``data.bands``), applied while stacking; the returned scenes hold
            exactly these bands, in this order.
        warp_block: block size of resampled bands (:func:`~geobp.sources.stack.warp_block_for` the tile size).

    Returns:
        Stack paths (:mod:`~geobp.sources.stackpath`), one per scene; None when ``spec`` is plain
        files, which need no stacking.

    Raises:
        ConfigError: a bad mapping, an unknown band or source, an item without a selected asset.
        DataNotFoundError: a file or document that does not exist, a source with no file.
        RasterReadError: a file that cannot be read.
    """
    if not is_stacked(spec):
        return None
    if isinstance(spec, Mapping):
        sources = parse_sources(spec)
    else:
        sources = [SourceSpec("", spec[0] if isinstance(spec, (list, tuple)) else str(spec))]
    several = len(sources) > 1
    wanted, order = _split_bands(bands, sources) if several else ({sources[0].name: list(bands) if bands else None}, None)
    headers: dict[str, RasterInfo] = {}
    reference = sources[0]
    scenes = _source_scenes(reference, reference.name, wanted[reference.name], headers, "images")
    # every other source's files pooled: the tiles of each band under its name, paired with each scene by footprint
    others = {s.name: [r for scene in _source_scenes(s, s.name, wanted[s.name], headers, f"images.{s.name}") for r in scene.refs]
              for s in sources[1:] if wanted[s.name] != []}
    for s in sources[1:]:
        if s.name in others and not others[s.name]:
            raise ConfigError(format_error(None, f"source {s.name!r} lists no band", f"check data.images.{s.name}"))
    seen: dict[str, int] = {}
    paths: list[str] = []
    for scene in scenes:
        if scene.name in seen:
            raise ConfigError(format_error(redact(scene.refs[0].path), f"two scenes are named {scene.name!r} (scene "
                                           "names must be unique: outputs are named after them)",
                                           "remove the duplicate item or file"))
        seen[scene.name] = 1
        stack = build_stack(scene.refs, others, missing="skip", warp_block=warp_block, headers=headers)
        if stack is None:  # not covered by another source: warned about by build_stack
            continue
        per_source = {reference.name: _names(reference.name, scene.refs, several),
                      **{name: _names(name, refs, several) for name, refs in others.items()}}
        stack = _ordered(stack, order, per_source)
        finest = _finest_file(stack, headers)
        paths.append(stack_path(stack, scene.name, (finest.block_height, finest.block_width)))
    if not paths:
        raise ConfigError(format_error(None, "no scene is covered by every source", "check that the sources overlap "
                                       "the reference scenes (their CRS and extent), see the warnings above"))
    return paths


def _finest_file(stack: SceneStack, headers: dict[str, RasterInfo]) -> RasterInfo:
    """The header of the reference file whose grid the stack took (whose blocks training tiles align to)."""
    for band in stack.bands:
        for f in band.files:
            if f in headers and Grid.from_info(headers[f]) == stack.grid:
                return headers[f]
    raise AssertionError("build_stack takes its grid from one of the reference's files")
