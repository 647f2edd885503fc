"""VRTs that rasterio does not build: a mosaic of one band's tiles, a stack of bands from several files,
and a warped VRT with blocks of a chosen size. Each is GDAL's VRT XML, opened by rasterio as a dataset.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from xml.sax.saxutils import escape

from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from geobp.raster import RasterInfo
from geobp.sources.bandref import BandRef
from geobp.sources.files import local_path
from geobp.sources.grid import Grid

__all__ = ["GDAL_TYPES", "mosaic_vrt", "stack_vrt", "warped_vrt"]

#: GDAL's names of numpy dtypes, for the VRTs written here.
GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
              "int32": "Int32", "float32": "Float32", "float64": "Float64"}


def mosaic_vrt(refs: Sequence[BandRef], infos: Sequence[RasterInfo], nodata: Sequence[float | None]) -> tuple[str, Grid]:
    """A VRT (XML) mosaicking one band of files on one pixel lattice; first file wins where they overlap.

    Written by hand: rasterio has no ``gdalbuildvrt``. GDAL paints a VRT's sources in order, later
    ones over earlier ones except where a source's NODATA is, so the files are listed last first.
    """
    first = Grid.from_info(infos[0])
    a, _, c, _, e, f = first.transform
    offsets = [first.lattice_offset(Grid.from_info(i)) for i in infos]  # first's origin on each file
    cols = [-o[1] for o in offsets if o is not None]
    rows = [-o[0] for o in offsets if o is not None]
    col0, row0 = min(cols), min(rows)
    col1 = max(cl + i.width for cl, i in zip(cols, infos))
    row1 = max(rw + i.height for rw, i in zip(rows, infos))
    grid = Grid(first.crs, (a, 0.0, c + a * col0, 0.0, e, f + e * row0), col1 - col0, row1 - row0)
    band_nodata = nodata[0]
    sources = []
    for ref, info, cl, rw, nd in reversed(list(zip(refs, infos, cols, rows, nodata))):
        nd_xml = "" if nd is None else f"<NODATA>{nd!r}</NODATA>"
        sources.append(
            f'<ComplexSource><SourceFilename relativeToVRT="0">{escape(local_path(ref.path))}'
            f"</SourceFilename><SourceBand>{ref.band}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{info.width}" ySize="{info.height}"/>'
            f'<DstRect xOff="{cl - col0}" yOff="{rw - row0}" xSize="{info.width}" ySize="{info.height}"/>{nd_xml}</ComplexSource>'
        )
    nd_band = "" if band_nodata is None else f"<NoDataValue>{band_nodata!r}</NoDataValue>"
    gt = ", ".join(repr(v) for v in (grid.transform[2], a, 0.0, grid.transform[5], 0.0, e))
    xml = (
        f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">'
        f"<SRS>{escape(CRS.from_user_input(first.crs).to_wkt())}</SRS><GeoTransform>{gt}</GeoTransform>"
        f'<VRTRasterBand dataType="{GDAL_TYPES[infos[0].dtype]}" band="1">{nd_band}{"".join(sources)}</VRTRasterBand>'
        "</VRTDataset>"
    )
    return xml, grid


def stack_vrt(files: Sequence[tuple[str, int]], grid: Grid, nodata: Sequence[float | None], dtype: str) -> str:
    """A VRT (XML) with one band per ``(path, band)``, all files on ``grid``: warped together, they
    share the warper's pixel mapping. Written by hand: rasterio has no ``gdalbuildvrt -separate``."""
    a, _, c, _, e, f = grid.transform
    bands = []
    for i, ((path, band), nd) in enumerate(zip(files, nodata), start=1):
        nd_xml = "" if nd is None else f"<NoDataValue>{nd!r}</NoDataValue>"
        bands.append(
            f'<VRTRasterBand dataType="{GDAL_TYPES[dtype]}" band="{i}">{nd_xml}<SimpleSource>'
            f'<SourceFilename relativeToVRT="0">{escape(local_path(path))}</SourceFilename><SourceBand>{band}</SourceBand>'
            f'<SrcRect xOff="0" yOff="0" xSize="{grid.width}" ySize="{grid.height}"/>'
            f'<DstRect xOff="0" yOff="0" xSize="{grid.width}" ySize="{grid.height}"/></SimpleSource></VRTRasterBand>'
        )
    gt = ", ".join(repr(v) for v in (c, a, 0.0, f, 0.0, e))
    return (f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">'
            f"<SRS>{escape(CRS.from_user_input(grid.crs).to_wkt())}</SRS><GeoTransform>{gt}</GeoTransform>"
            f'{"".join(bands)}</VRTDataset>')


def warped_vrt(src: Any, grid: Grid, resampling: str, src_nodata: float | None, nodata: float, dtype: str,
               block: int) -> str:
    """A warped VRT (XML) of ``src`` onto ``grid`` exactly, in ``block`` px blocks.

    rasterio's :class:`~rasterio.vrt.WarpedVRT` builds the warp (transformer, per-band nodata with
    ``UNIFIED_SRC_NODATA=NO``); its VRT has GDAL's fixed 512 x 128 blocks, with which a 256 px
    tile would warp twice its pixels and the extra blocks crowd the block cache. So its XML (GDAL's
    own) is taken and given blocks of ``block`` px, a tile's size: rasterio cannot set them.
    """
    with WarpedVRT(
        src, crs=grid.crs, transform=grid.affine, width=grid.width, height=grid.height,
        resampling=Resampling[resampling], src_nodata=src_nodata, nodata=nodata, dtype=dtype, UNIFIED_SRC_NODATA="NO",
    ) as vrt:
        xml = vrt.tags(ns="xml:VRT")["xml:VRT"]
    bx, by = min(block, grid.width), min(block, grid.height)
    xml = re.sub(r"<BlockXSize>\d+</BlockXSize>", f"<BlockXSize>{bx}</BlockXSize>", xml)
    return re.sub(r"<BlockYSize>\d+</BlockYSize>", f"<BlockYSize>{by}</BlockYSize>", xml)
