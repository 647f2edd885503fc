"""Per-scene validity maps (valid-pixel fraction per cell) from the cheapest source a file offers.

Training tiles with too much nodata are skipped and evaluation tiles with none are left out,
which needs each scene's validity at cell resolution (:data:`VALIDITY_FACTOR` pixels). Decoding
every pixel of every scene for it is what made start-up grow with the data, so the map comes
from, in order:

- ``all_valid``: an integer image with no nodata value cannot hold a missing pixel: nothing read;
- ``mask``: the file's own mask band (GDAL's per-dataset mask, e.g. written with
  ``gdal_translate -mask`` or by most COG tools), read decimated: one bit per pixel;
- ``overview``: the image's internal overviews, read at the map's resolution (a cell counts as
  valid or not as a whole: an approximation at the nodata edges);
- ``scan``: a full read of the file, once, cached (:func:`geobp.data.preprocessing.load_scene_stats`).
  Several processes of a node split these scans between them;
- ``at_read``: nothing read at start-up; the map says "all valid" and training tiles with too
  much nodata are rejected when read (:class:`geobp.data.samplers.Redraw`).

Which of the last two a scene without a cheap source gets is ``mode``: ``scan``, ``at_read``,
or ``auto``: scan while those scenes hold at most :data:`SCAN_BUDGET_BYTES` of decoded pixels
(decoded once: the scans are cached), read-time rejection beyond.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from rasterio.enums import MaskFlags, Resampling

from geobp.data.preprocessing import VALIDITY_FACTOR, load_scene_stats, scene_cache_file, valid_pixels
from geobp.data.ranks import computed_once, local_rank, local_world_size
from geobp.raster import RasterInfo, open_raster

ValiditySource = Literal["all_valid", "mask", "overview", "scan", "at_read"]
ValidityMode = Literal["auto", "scan", "at_read"]

#: Under ``auto``, scenes without a cheap validity source are scanned while they hold at most
#: this many bytes of decoded pixels in all (a scan decodes every pixel, so its start-up cost grows
#: with this); larger datasets get read-time rejection instead.
SCAN_BUDGET_BYTES = 2**30


def map_shape(info: RasterInfo) -> tuple[int, int]:
    """Cells of a scene's validity map."""
    f = VALIDITY_FACTOR
    return -(-info.height // f), -(-info.width // f)


def cheap_source(src: rasterio.DatasetReader, dtype: str, nodata: float | None) -> ValiditySource | None:
    """Where an open file's validity map can come from without decoding it (its header only), or None."""
    nodata = src.nodata if nodata is None else nodata
    if MaskFlags.per_dataset in src.mask_flag_enums[0]:
        return "mask"
    if nodata is None and np.issubdtype(np.dtype(dtype), np.integer):
        return "all_valid"
    if src.overviews(1):
        return "overview"
    return None


def cheap_validity(info: RasterInfo, nodata: float | None) -> tuple[np.ndarray, ValiditySource] | None:
    """The validity map from the file's header, mask band or overviews; None when only a full
    read can tell (no mask band, no overviews, and missing pixels possible)."""
    shape = map_shape(info)
    with open_raster(info.path) as src:
        source = cheap_source(src, info.dtype, nodata)
        if source == "mask":
            m = src.read_masks(1, out_shape=shape, resampling=Resampling.average)
            return (m.astype(np.float32) / 255.0), "mask"
        if source == "all_valid":
            return np.ones(shape, np.float32), "all_valid"
        if source == "overview":
            data = src.read(out_shape=(src.count, *shape), resampling=Resampling.nearest)
            return valid_pixels(data, src.nodata if nodata is None else nodata).astype(np.float32), "overview"
    return None


def decoded_bytes(info: RasterInfo) -> int:
    """Bytes of a scene's decoded pixels (what a full read decodes)."""
    return info.height * info.width * info.count * np.dtype(info.dtype).itemsize


def startup_note(infos: Sequence[RasterInfo], nodata: float | None, scan_budget: int = SCAN_BUDGET_BYTES) -> str | None:
    """One line on the scenes whose nodata only a full read can find (what ``geobp fit`` does about
    them under ``data.validity: auto``, and how to spare it), or None when there are none."""
    need = []
    for info in infos:
        with open_raster(info.path) as src:
            if cheap_source(src, info.dtype, nodata) is None:
                need.append(info)
    if not need:
        return None
    size = sum(decoded_bytes(i) for i in need)
    what = (f"decodes them once at start-up ({size / 2**20:,.0f} MiB, then cached)" if size <= scan_budget else
            f"does not scan them ({size / 2**30:,.1f} GiB) but rejects tiles with too much nodata as it reads them")
    return (f"{len(need)} of {len(infos)} scenes have a nodata value but neither a mask band nor overviews, so `geobp fit` "
            f"{what} (data.validity: auto). To spare it: add overviews (`gdaladdo -r nearest FILE 2 4 8 16`) or a mask band.")


def validity_maps(
    infos: Sequence[RasterInfo],
    nodata: float | None,
    cache_root: str | Path,
    progress: bool = False,
    mode: ValidityMode = "auto",
    scan_budget: int = SCAN_BUDGET_BYTES,
) -> tuple[list[np.ndarray], list[ValiditySource]]:
    """The validity map of every scene, and where each came from.

    Scenes that need a full read are scanned once and cached (``mode`` and ``scan_budget``, in
    bytes of decoded pixels, decide whether they are; see the module docstring); with several
    processes on a node (``LOCAL_RANK``), process r scans scenes r, r + n, ... and reads the
    others' from the cache. Unscanned scenes get an all-valid map and the source ``at_read``.
    """
    maps: list[np.ndarray | None] = []
    sources: list[ValiditySource] = []
    for info in infos:
        found = cheap_validity(info, nodata)
        maps.append(found[0] if found else None)
        sources.append(found[1] if found else "scan")
    todo = [i for i, m in enumerate(maps) if m is None]
    need = sum(decoded_bytes(infos[i]) for i in todo)
    if mode == "at_read" or (mode == "auto" and need > scan_budget):
        for i in todo:
            maps[i], sources[i] = np.ones(map_shape(infos[i]), np.float32), "at_read"
        todo = []
    if todo:
        rank, size = local_rank(), local_world_size()
        mine = [i for k, i in enumerate(todo) if k % size == rank]
        others = [i for k, i in enumerate(todo) if k % size != rank]
        order = mine + others  # this process's share first, then the others' (cached by then, or computed)
        if progress and len(order) > 1:
            from rich.progress import track

            order = list(track(order, description="Validity of scenes without mask or overviews", transient=True))
        for i in order:
            path = infos[i].path
            stats = computed_once(scene_cache_file(path, nodata, cache_root), lambda p=path: load_scene_stats(p, nodata, cache_root),
                                  lambda p=path: load_scene_stats(p, nodata, cache_root), owner=i in mine)
            maps[i] = stats.validity
    return maps, sources  # type: ignore[return-value]
