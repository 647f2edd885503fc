"""GeoTIFF helpers of the outputs: file naming, derived profiles, colour tables, atomic (COG) writes.

The outputs themselves, and the place to add a format: :mod:`geobp.inference.sinks`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import rasterio
import rasterio.shutil

from geobp.choices import Probabilities  # noqa: F401 - re-exported for the CLI
from geobp.atomic import atomic_path
from geobp.raster import derive_profile


#: Suffix of the class map written for an input ``<stem>.tif``.
CLASSES_SUFFIX = "_classes"

# Colours (RGB) for common land-cover names; other classes take the palette below in order.
_NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "water": (30, 100, 200), "forest": (20, 110, 40), "tree": (20, 110, 40), "cropland": (230, 200, 80),
    "crop": (230, 200, 80), "urban": (200, 40, 40), "built": (200, 40, 40), "bare_soil": (170, 130, 90),
    "bare": (170, 130, 90), "grassland": (140, 200, 90), "grass": (140, 200, 90), "wetland": (90, 170, 160),
    "snow": (240, 240, 250), "shrub": (160, 150, 60), "cloud": (200, 200, 200), "background": (0, 0, 0),
}
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
)


def colour_table(num_classes: int, class_names: list[str], nodata_value: int) -> dict[int, tuple[int, int, int, int]]:
    """A colour per class id (named land-cover classes get their usual colour), transparent for nodata."""
    table: dict[int, tuple[int, int, int, int]] = {}
    k = 0
    for i in range(num_classes):
        rgb = _NAMED_COLOURS.get(class_names[i].lower()) if i < len(class_names) else None
        if rgb is None:
            rgb = _PALETTE[k % len(_PALETTE)]
            k += 1
        table[i] = (*rgb, 255)
    table[nodata_value] = (0, 0, 0, 0)
    return table


def classes_profile(src_profile: dict[str, Any], nodata_value: int) -> dict[str, Any]:
    """Profile of the class map: the input's grid, one uint8 band, nodata tag, tiled and compressed."""
    return derive_profile(src_profile, count=1, dtype="uint8", nodata=nodata_value, interleave="band", BIGTIFF="IF_SAFER")


def aux_profile(src_profile: dict[str, Any], count: int) -> dict[str, Any]:
    """Profile of the probabilities or confidence file (no nodata tag: nodata is an internal mask)."""
    return derive_profile(src_profile, count=count, dtype="uint8", nodata=None, interleave="pixel", BIGTIFF="IF_SAFER")


@contextmanager
def atomic_output(final: Path, cog: bool) -> Iterator[Path]:
    """Yield a temporary GeoTIFF path beside ``final``; on success make it ``final`` (as a COG if asked).

    The COG is made with GDAL's COG driver from the finished GeoTIFF (overviews included:
    nearest-neighbour for class maps, average for the rest). On an exception nothing is left:
    neither ``final`` nor any temporary file.
    """
    with atomic_path(final) as tmp:
        if not cog:
            yield tmp
            return
        fd, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".gtiff.tif", dir=final.parent)
        os.close(fd)
        gtiff = Path(name)
        try:
            yield gtiff
            with rasterio.open(gtiff) as ds:
                paletted = ds.count == 1 and ds.colorinterp[0] == rasterio.enums.ColorInterp.palette
            rasterio.shutil.copy(
                gtiff, tmp, driver="COG", compress="DEFLATE", BIGTIFF="IF_SAFER",
                RESAMPLING="NEAREST" if paletted else "AVERAGE",
            )
        finally:
            gtiff.unlink(missing_ok=True)
