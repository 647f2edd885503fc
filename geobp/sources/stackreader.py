"""A stacked scene as a rasterio-like reader, and its stack path (:mod:`geobp.sources.stackpath`).

:func:`stack_path` names a :class:`~geobp.sources.stack.SceneStack`; :func:`geobp.raster.open_reader`
opens such a path as a :class:`StackReader`, which answers the parts of
:class:`rasterio.io.DatasetReader` that geobp's readers use (size, CRS, transform, dtypes, nodata,
blocks, band descriptions, ``read``). So the tile dataset, the statistics and validity passes,
``geobp check`` and ``geobp infer`` read a scene of several files, grids and sensors as they
read one GeoTIFF.

What a stack reads as (:func:`output_type`): the bands' common dtype and nodata value when every
band shares one (Sentinel-2 alone: uint16, nodata 0), else float32 with NaN for nodata (Sentinel-2
with Sentinel-1 and a DEM). In either form every band holds the nodata value at a pixel where any
band has no data, so a pixel is valid only where every band is (:class:`SceneStack`'s rule), and
geobp's validity test (nodata in every band, or a non-finite band) agrees with it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

import numpy as np
import rasterio.windows
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.windows import Window

from geobp.errors import ConfigError, format_error
from geobp.sources.grid import Grid
from geobp.sources.stack import SceneStack, SourceSummary, StackBand, _Part
from geobp.sources.stackpath import PREFIX, display, is_stack_path, parse

__all__ = ["StackReader", "output_type", "read_stack_path", "stack_path"]


def output_type(stack: SceneStack) -> tuple[str, float | None]:
    """(dtype, nodata) a stack reads as: the bands' own when they all share them and the nodata is a
    number, else ``("float32", nan)``."""
    dtypes = set(stack.dtypes)
    nodata = {("nan" if v is not None and math.isnan(v) else v) for v in stack.nodata}
    if len(dtypes) == 1 and len(nodata) == 1:
        (dtype,), (value,) = dtypes, nodata
        if value == "nan":
            return dtype, math.nan
        if value is not None:
            return dtype, float(value)
        if not any(p.offset is None for b in stack.bands for p in b.parts) and all(b.parts for b in stack.bands):
            return dtype, None  # no nodata anywhere: every pixel of the files is data
    return "float32", math.nan


def stack_path(stack: SceneStack, name: str, block: tuple[int, int]) -> str:
    """The stack path of ``stack``: everything needed to read it, as one string.

    Args:
        stack: the scene.
        name: its name (a STAC item id, the reference file's stem): output files are named after it.
        block: (height, width) of the reference file's blocks: training tiles are aligned to them.
    """
    doc = {
        "name": name,
        "grid": asdict(stack.grid),
        "block": list(block),
        "warp_block": stack.warp_block,
        "bands": [{**asdict(b), "parts": [asdict(p) for p in b.parts]} for b in stack.bands],
        "sources": [asdict(s) for s in stack.describe()],
    }
    return PREFIX + json.dumps(doc, separators=(",", ":"))


def _grid(d: dict[str, Any]) -> Grid:
    return Grid(d["crs"], tuple(d["transform"]), int(d["width"]), int(d["height"]))  # type: ignore[arg-type]


def read_stack_path(path: str) -> tuple[str, SceneStack, tuple[int, int]]:
    """(name, stack, block shape) of a stack path.

    Raises:
        ConfigError: ``path`` is not a stack path geobp wrote.
    """
    try:
        doc = parse(path)
        bands = [StackBand(b["name"], b["source"], b["resampling"], b["dtype"], b["nodata"], tuple(
            _Part(p["path"], int(p["band"]), _grid(p["grid"]), None if p["offset"] is None else tuple(p["offset"]),
                  p["src_nodata"], p["dtype"], tuple(p["files"])) for p in b["parts"])) for b in doc["bands"]]
        summaries = [SourceSummary(s["source"], tuple(s["crs"]), tuple(tuple(r) for r in s["res"]), tuple(s["bands"]),
                                   tuple(s["files"]), float(s["coverage"])) for s in doc["sources"]]
        stack = SceneStack(_grid(doc["grid"]), bands, summaries, int(doc["warp_block"]))
        return str(doc["name"]), stack, (int(doc["block"][0]), int(doc["block"][1]))
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ConfigError(format_error(None, f"not a geobp stack path ({type(err).__name__}: {err})",
                                       "name the scene by its files or STAC item, not by a stack path of your own")) from None


class StackReader:
    """A :class:`SceneStack` opened as the subset of a rasterio dataset reader that geobp uses.

    ``read`` gives the bands in :func:`output_type`'s dtype, with the nodata value in every band
    wherever any band has no data. No overviews and no mask band: validity comes from a scan or from
    read-time rejection (:mod:`geobp.data.validity`).
    """

    def __init__(self, path: str) -> None:
        if not is_stack_path(path):
            raise ConfigError(format_error(None, "not a stack path", "open files with geobp.raster.open_reader"))
        self.name = path
        self.scene, self.stack, self._block = read_stack_path(path)
        dtype, self.nodata = output_type(self.stack)
        self.count = len(self.stack.bands)
        self.dtypes = (dtype,) * self.count
        self.width, self.height = self.stack.grid.width, self.stack.grid.height
        self.crs = CRS.from_user_input(self.stack.grid.crs)
        self.transform = self.stack.grid.affine
        self.block_shapes = [self._block] * self.count
        self.descriptions = self.stack.band_names
        self.colorinterp = (ColorInterp.undefined,) * self.count
        self.nodatavals = (self.nodata,) * self.count
        self.closed = False

    def __repr__(self) -> str:
        return f"<StackReader {display(self.name)}>"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        return self.stack.grid.res

    @property
    def bounds(self) -> rasterio.coords.BoundingBox:
        return rasterio.coords.BoundingBox(*self.stack.grid.bounds)

    @property
    def mask_flag_enums(self) -> list[list[MaskFlags]]:
        flag = MaskFlags.all_valid if self.nodata is None else MaskFlags.nodata
        return [[flag]] * self.count

    @property
    def profile(self) -> dict[str, Any]:
        bh, bw = self._block
        return {"driver": "VRT", "dtype": self.dtypes[0], "nodata": self.nodata, "width": self.width, "height": self.height,
                "count": self.count, "crs": self.crs, "transform": self.transform, "blockxsize": bw, "blockysize": bh,
                "tiled": True}

    def overviews(self, bidx: int) -> list[int]:
        return []

    def tags(self, *args: Any, **kwargs: Any) -> dict[str, str]:
        return {}

    def window_transform(self, window: Window) -> Any:
        return rasterio.windows.transform(window, self.transform)

    def window_bounds(self, window: Window) -> tuple[float, float, float, float]:
        return rasterio.windows.bounds(window, self.transform)

    def read(self, indexes: int | list[int] | None = None, window: Window | None = None, out_shape: Any = None,
             **kwargs: Any) -> np.ndarray:
        """Bands of ``window`` (the whole scene when None) as rasterio's ``read`` gives them.

        Raises:
            RasterReadError: a file of the stack cannot be read (the message names it).
            ConfigError: a decimated or masked read (``out_shape``, ``masked``), which stacks do not offer.
        """
        if out_shape is not None or kwargs.get("masked") or kwargs.get("boundless"):
            raise ConfigError(format_error(display(self.name), "a stacked scene is read at full resolution only",
                                           "read windows of it"))
        window = Window(0, 0, self.width, self.height) if window is None else window
        values, valid = self.stack.read(window, out_dtype=self.dtypes[0])
        if self.nodata is not None and not valid.all():
            values[:, ~valid] = self.nodata
        if indexes is None:
            return values
        if isinstance(indexes, int):
            return values[indexes - 1]
        return values[[i - 1 for i in indexes]]

    def read_masks(self, indexes: int | list[int] | None = None, window: Window | None = None, **kwargs: Any) -> np.ndarray:
        """255 where every band has data, 0 elsewhere (per band, as rasterio gives masks)."""
        window = Window(0, 0, self.width, self.height) if window is None else window
        _, valid = self.stack.read(window, out_dtype=self.dtypes[0])
        mask = np.where(valid, 255, 0).astype(np.uint8)
        if isinstance(indexes, int):
            return mask
        n = self.count if indexes is None else len(indexes)
        return np.repeat(mask[None], n, axis=0)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> StackReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
