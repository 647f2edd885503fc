"""Output side of inference: file names, derived profiles, colour tables, block-aligned strip writes, COG.

Outputs of one input raster (see :func:`output_paths`):

- ``<stem>_classes.tif``: uint8 class ids, nodata pixels set to ``nodata_value`` (255) with a
  nodata tag, a colour table, class names in the ``CLASS_NAMES`` tag (comma separated) and
  ``NUM_CLASSES``.
- ``<stem>_probs.tif`` (``probabilities="probs"``): one uint8 band per class, probability
  times 255 rounded (band scale 1/255; a pixel's bands sum to 255 up to rounding), band
  descriptions are the class names; nodata pixels are 0 in every band and masked by an
  internal mask band.
- ``<stem>_confidence.tif`` (``probabilities="confidence"``): one uint8 band, the highest
  class probability times 255, masked like the probabilities.

All have the input's CRS, transform and size, are tiled (256 x 256) and deflate-compressed,
and are Cloud Optimized GeoTIFFs on request.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from geobp.errors import OutputExistsError, format_error
from geobp.inference.choices import Probabilities
from geobp.atomic import atomic_path
from geobp.raster import derive_profile


#: Suffix of the class map written for an input ``<stem>.tif``.
CLASSES_SUFFIX = "_classes"
AUX_SUFFIX: dict[str, str] = {"probs": "_probs", "confidence": "_confidence"}

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


def output_paths(dst: str | Path, probabilities: Probabilities = "none") -> dict[str, Path]:
    """Files written for class map ``dst``: ``{"classes": dst}`` plus ``"probs"`` or ``"confidence"``.

    The auxiliary file sits beside ``dst``, named after its stem without ``_classes``:
    ``out/a_classes.tif`` gives ``out/a_probs.tif`` or ``out/a_confidence.tif``.
    """
    dst = Path(dst)
    paths = {"classes": dst}
    if probabilities != "none":
        stem = dst.stem.removesuffix(CLASSES_SUFFIX)
        paths[probabilities] = dst.with_name(f"{stem}{AUX_SUFFIX[probabilities]}{dst.suffix or '.tif'}")
    return paths


def output_bands(probabilities: Probabilities, num_classes: int) -> int:
    """Bands of an encoded prediction strip: the class ids, then ``num_classes`` probabilities or one confidence."""
    return 1 + (num_classes if probabilities == "probs" else 1 if probabilities == "confidence" else 0)


def check_outputs_free(paths: dict[str, Path], overwrite: bool) -> None:
    """Refuse to overwrite existing outputs unless asked.

    Raises:
        OutputExistsError: a path exists and ``overwrite`` is False; the message names it.
    """
    if overwrite:
        return
    for path in paths.values():
        if path.exists():
            raise OutputExistsError(
                format_error(path, "output exists", "pass --overwrite (overwrite=True) to replace it, or choose another output folder")
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


class StripWriter:
    """Writes full-width row strips in order to open datasets, in windows aligned to the block rows.

    Rows are held back (uint8, fewer than ``block_height`` plus one strip) until whole block rows
    can be written, so no compressed block is written twice. Band 0 of a strip goes to the class
    map, the other bands (if any) to the auxiliary file, whose mask is 0 where the class is nodata.
    """

    def __init__(self, classes: rasterio.io.DatasetWriter, aux: rasterio.io.DatasetWriter | None, nodata_value: int) -> None:
        self.classes = classes
        self.aux = aux
        self.nodata_value = nodata_value
        self.block_height = classes.block_shapes[0][0]
        self.width = classes.width
        self.height = classes.height
        self._pending: list[np.ndarray] = []
        self._row = 0  # first row not yet written
        self._pending_rows = 0
        self.peak_pending_rows = 0

    def write(self, row: int, strip: np.ndarray) -> None:
        """Queue ``strip`` (uint8 [bands, rows, width]) starting at ``row`` and write the whole block rows."""
        if row != self._row + self._pending_rows:
            raise RuntimeError(f"strips out of order: expected row {self._row + self._pending_rows}, got {row}")
        self._pending.append(strip)
        self._pending_rows += strip.shape[1]
        self.peak_pending_rows = max(self.peak_pending_rows, self._pending_rows)
        last = self._row + self._pending_rows == self.height
        ready = self._pending_rows if last else self._pending_rows // self.block_height * self.block_height
        if ready:
            data = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending, axis=1)
            self._write(self._row, data[:, :ready])
            rest = data[:, ready:]
            self._pending = [rest.copy()] if rest.shape[1] else []
            self._row += ready
            self._pending_rows -= ready

    def _write(self, row: int, data: np.ndarray) -> None:
        window = Window(0, row, self.width, data.shape[1])
        self.classes.write(data[0], 1, window=window)
        if self.aux is not None:
            self.aux.write(data[1:], window=window)
            mask = np.where(data[0] == self.nodata_value, 0, 255).astype(np.uint8)
            self.aux.write_mask(mask, window=window)

    @property
    def complete(self) -> bool:
        """True when every row of the raster has been written."""
        return self._row == self.height and not self._pending_rows


class OutputFiles:
    """The open output files of one raster (temporary names), written strip by strip in row order.

    Opens the class map (colour table, band description, ``CLASS_NAMES``/``NUM_CLASSES``/
    ``NODATA_VALUE`` tags) and, for ``probabilities`` other than ``none``, the auxiliary file,
    then writes strips through a :class:`StripWriter`.

    Args:
        paths: ``{"classes": path}`` plus ``"probs"`` or ``"confidence"`` (see :func:`output_paths`).
        profile: the input raster's profile (grid, CRS, transform).
        class_names: one name per class.
    """

    def __init__(
        self,
        paths: dict[str, Path],
        profile: dict[str, Any],
        class_names: list[str],
        probabilities: Probabilities,
        nodata_value: int,
    ) -> None:
        k = len(class_names)
        #: bands of the strips this writer takes: the class ids, then the auxiliary bands
        self.bands = output_bands(probabilities, k)
        aux_bands = self.bands - 1
        self.datasets: list[Any] = []
        try:
            ds = rasterio.open(paths["classes"], "w", **classes_profile(profile, nodata_value))
            self.datasets.append(ds)
            ds.write_colormap(1, colour_table(k, class_names, nodata_value))
            ds.set_band_description(1, "class")
            ds.update_tags(CLASS_NAMES=",".join(class_names), NUM_CLASSES=str(k), NODATA_VALUE=str(nodata_value))
            aux = None
            if aux_bands:
                aux = rasterio.open(paths[probabilities], "w", **aux_profile(profile, aux_bands))
                self.datasets.append(aux)
                descriptions = class_names if probabilities == "probs" else ["confidence"]
                for b, name in enumerate(descriptions, start=1):
                    aux.set_band_description(b, name)
                aux.scales = (1 / 255,) * aux_bands
                aux.update_tags(CLASS_NAMES=",".join(class_names), NUM_CLASSES=str(k), SCALE="value / 255 = probability")
            self.strips = StripWriter(ds, aux, nodata_value)
        except BaseException:
            self.close()
            raise

    def write(self, row: int, strip: np.ndarray) -> None:
        """Write ``strip`` (uint8 [bands, rows, width]) starting at ``row`` (strips come in row order)."""
        self.strips.write(row, strip)

    @property
    def complete(self) -> bool:
        """True when every row has been written."""
        return self.strips.complete

    def close(self) -> None:
        """Close the files (flushing them)."""
        for ds in self.datasets:
            ds.close()
        self.datasets.clear()


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
